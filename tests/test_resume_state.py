"""Resume restores the coordinator's state bit for bit: DP accountant and noise RNG, FedAdam.

The real coordinator (``server.federation.run_federation``) and the real site glue
(``client.app``) run in this process over ``InProcessGrid``, with no Ray and no SuperLink: a
"crash" is an exception at a stage boundary, after which a new coordinator is prepared from
the run folder alone (as a restarted process would be) and resumes. Every published version
of every module, every round's epsilon and the final checkpoint must equal an uninterrupted
run's. A resume that forgot the accountant (epsilon restarts at 0), reseeded the noise (the
first round's noise again) or dropped the FedAdam moments differs from the reference.

Tiny settings (2 sites, 1 local step, 3 rounds, no Ray): about 10 s per test on 2 cores, plus
about 8 s per configuration for the uninterrupted reference run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from client.app import make_client_app
from common.config import RunConfig, load_config
from common.registry import Registry
from common.registry_format import ADAPTER_FILE
from server.checkpoint import load_checkpoint
from server.federation import prepare, run_federation
from tests.in_process import Crash, InProcessGrid, flower_task_identity

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3
TINY = [
    f"federation.rounds={ROUNDS}",
    "federation.sites=2",
    "federation.min-sites=2",
    "data.partition='iid'",
    "train.local-steps=1",
    "privacy.mode='none'",
]
CONFIGS = {
    # Central DP with a fixed noise seed (tests only): the noise is reproducible, so a resumed
    # run that restarted the generator from the seed publishes round 1's noise again.
    "dp-central": [
        "privacy.dp.enabled=true",
        "privacy.dp.clip=0.05",
        "privacy.dp.noise-multiplier=0.5",
        "privacy.dp.seed=7",
    ],
    # FedAdam: first and second moments and the step count carry over between rounds.
    "fedadam": ["aggregation.server-optimizer='fedadam'", "aggregation.server-lr=0.01"],
}


task_identity = pytest.fixture(scope="module", autouse=True)(flower_task_identity)


def _config(name: str) -> RunConfig:
    return load_config(REPO / "examples" / "tiny.toml", [*TINY, *CONFIGS[name]])


def _run(cfg: RunConfig, out: Path, crash_before: tuple[int, str] | None = None) -> None:
    """A run from scratch, or, with ``crash_before``, one killed there and then resumed by a
    coordinator that knows only the run folder."""
    app = make_client_app(cfg, None, out / "sites")
    if crash_before is None:
        run_federation(InProcessGrid(app, cfg.federation.sites), prepare(cfg, out))
        return
    with pytest.raises(Crash):
        run_federation(InProcessGrid(app, cfg.federation.sites, crash_before), prepare(cfg, out))
    # A restarted process: a new coordinator (fresh Aggregator), new site contexts.
    app = make_client_app(cfg, None, out / "sites")
    run_federation(InProcessGrid(app, cfg.federation.sites), prepare(cfg, out), resume=True)


def _published(out: Path) -> dict[str, Any]:
    """Every version of every module (SHA-256 of its tensors, its manifest's epsilon), each
    round's epsilon and evaluation loss, and the final checkpoint's aggregator state."""
    registry = Registry(out / "registry")
    versions = {
        v.name: (
            hashlib.sha256((v.path / ADAPTER_FILE).read_bytes()).hexdigest(),
            json.loads((v.path / "manifest.json").read_text()).get("epsilon"),
        )
        for module in registry.modules()
        for v in registry.versions(module)
    }
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ckpt = load_checkpoint(out)
    assert ckpt is not None
    return {
        "versions": versions,
        "rounds": [(m["round"], m.get("epsilon"), m.get("eval_loss")) for m in lines],
        "aggregator": ckpt.extra["aggregator"],
        "optimizer": {
            k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
            for k, v in ckpt.optimizer_tensors.items()
        },
    }


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Any]]:
    name = str(request.param)
    out = tmp_path_factory.mktemp(f"reference-{name}") / "run"
    _run(_config(name), out)
    return name, _published(out)


# Stage boundaries: before round 2's training (round 1 checkpointed and evaluated), and
# between round 2's checkpoint and its evaluation.
CRASHES = [(2, "train"), (2, "evaluate")]


@pytest.mark.parametrize("crash_before", CRASHES, ids=lambda c: f"before-{c[1]}-{c[0]}")
def test_resume_is_bit_identical(
    tmp_path: Path, reference: tuple[str, dict[str, Any]], crash_before: tuple[int, str]
) -> None:
    name, expected = reference
    out = tmp_path / "run"
    _run(_config(name), out, crash_before)
    got = _published(out)
    assert got["versions"] == expected["versions"]  # every version of every module
    assert got["rounds"] == expected["rounds"]  # every round's epsilon, in metrics.jsonl
    assert got["aggregator"] == expected["aggregator"]  # accountant, noise RNG, scalars
    assert got["optimizer"] == expected["optimizer"]  # FedAdam's moments
    if name == "dp-central":
        epsilons = [eps for _, eps, _ in got["rounds"]]
        assert all(e is not None for e in epsilons) and epsilons == sorted(epsilons)
        assert epsilons[-1] > epsilons[1] > 0  # spent over all rounds, not since the resume
    else:
        assert got["optimizer"], "FedAdam keeps moment tensors"
