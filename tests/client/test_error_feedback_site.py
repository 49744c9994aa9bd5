"""Error feedback through the real site glue: the residual a site keeps, round by round."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from client.app import SiteKeys, client_app, simulation_sites
from client.kept_states import RESIDUAL_FOLDER
from common.config import load_config
from common.registry import Registry
from fedlora.simulate import provision_keys
from server.federation import prepare, run_federation
from tests.helpers.in_process import InProcessGrid, flower_task_identity

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.toml"
task_identity = pytest.fixture(flower_task_identity)


@pytest.mark.slow  # a real two-round federation of the tiny model, in process (~15 s)
def test_each_site_keeps_its_int4_residual_after_every_round(
    tmp_path: Path, task_identity: None
) -> None:
    """The real coordinator and site glue over ``InProcessGrid``, int4 up-link (error feedback
    on by default): after rounds 1 and 2 every site holds the rounding residual of each sent
    tensor, non-zero (int4 drops something) and bounded by one rounding error, and the
    federation publishes both rounds."""
    overrides = ["federation.rounds=2", "data.partition='iid'", "privacy.encoding='int4'"]
    cfg = load_config(TINY, overrides)
    out = tmp_path / "run"
    sealing, _ = provision_keys(cfg, out)
    app = client_app(simulation_sites(cfg, out / "sites"), SiteKeys(out / "keys"))
    coordinator = prepare(cfg, out, sealing)
    run_federation(InProcessGrid(app, cfg.federation.sites), coordinator)

    shared = Registry(out / "registry").load("shared", 2)
    for site in range(cfg.federation.sites):
        folder = out / "sites" / f"site-{site}" / coordinator.run_id / RESIDUAL_FOLDER
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["after-v0001.safetensors", "after-v0002.safetensors"], names
        residual = load_file(folder / names[-1])
        assert {key.removeprefix("shared/") for key in residual} == set(shared)
        largest = max(float(t.abs().max()) for t in residual.values())
        assert 0.0 < largest < 1.0
