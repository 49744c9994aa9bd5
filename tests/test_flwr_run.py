"""``flwr run .``: the deployed app components run a simulation in Flower's runtime (issue 15)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.deploy_app import DEPLOYED_APP, app_for
from common.app_run_config import simulated_run
from common.errors import ConfigError
from tests.helpers.in_process import InProcessGrid
from tests.helpers.local_superlink import flwr_run, local_env, stop_local_superlink

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny.toml"


def test_a_run_without_a_keys_folder_is_a_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    run = simulated_run({"config": "examples/tiny.toml", "out": "", "keys": ""}, 42)
    assert run is not None
    assert run.config == TINY and run.out == REPO / "runs" / "flwr-42"
    assert run.keys == run.out / "keys" and run.sites == run.out / "sites"
    named = simulated_run({"config": str(TINY), "out": "runs/mine", "keys": ""}, 42)
    assert named is not None and named.out == REPO / "runs" / "mine"
    # `fedlora coordinator run` names the coordinator's keys folder: a deployed run.
    deployed = {"config": str(TINY), "out": "/runs/x", "keys": "/coordinator/keys"}
    assert simulated_run(deployed, 42) is None


def test_a_simulation_needs_an_existing_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"missing\.toml is not a file \(relative to"):
        simulated_run({"config": "examples/missing.toml", "keys": ""}, 1)
    with pytest.raises(ConfigError, match="'config' is empty"):
        simulated_run({"config": "", "keys": ""}, 1)


def _context(run_config: dict[str, str], node_config: dict[str, str | int]) -> Context:
    return Context(
        run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def test_the_server_app_refuses_a_missing_config_and_a_wrong_node_count(tmp_path: Path) -> None:
    from server.deploy_app import app

    grid = InProcessGrid(DEPLOYED_APP, sites=2)
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing} is not a file")):
        app(grid, _context({"config": str(missing), "out": "", "keys": ""}, {}))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"2 SuperNodes but .* federation.sites = 3; run flwr"):
        app(grid, _context({"config": str(TINY), "out": str(out), "keys": ""}, {}))
    assert not out.exists()  # refused before anything was written


def test_the_client_app_serves_virtual_sites_only_in_a_simulation(tmp_path: Path) -> None:
    simulation = {"config": str(TINY), "out": str(tmp_path), "keys": ""}
    virtual = app_for(_context(simulation, {"partition-id": 0, "num-partitions": 3}))
    assert virtual is not DEPLOYED_APP
    assert app_for(_context(simulation, {"partition-id": 1, "num-partitions": 3})) is virtual
    deployed = {"config": "/c/run.toml", "out": "/runs/x", "keys": "/coordinator/keys"}
    assert app_for(_context(deployed, {"site-config": "/s/site.toml"})) is DEPLOYED_APP
    with pytest.raises(ConfigError, match="a deployed site takes part only in runs that"):
        app_for(_context(simulation, {"site-config": "/s/site.toml"}))


def _one_round_tiny(folder: Path) -> Path:
    """examples/tiny.toml with one round, its data named by absolute path."""
    text = TINY.read_text(encoding="utf-8")
    data = TINY.parent / "data" / "dolly-tiny.jsonl"
    for old, new in (("rounds = 3", "rounds = 1"), ('"data/dolly-tiny.jsonl"', f'"{data}"')):
        assert old in text
        text = text.replace(old, new)
    path = folder / "tiny-1.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _run_once(config: Path, out: Path, supernodes: int, ray_dir: Path) -> str:
    """``flwr run .`` of ``config`` into ``out`` on a local SuperLink of its own (stopped
    after); the command's output."""
    try:
        return flwr_run(
            "--run-config",
            f"config='{config}' out='{out}'",
            "--federation-config",
            f"num-supernodes={supernodes}",
            env=local_env(ray_dir / "flwr", ray_dir),
        )
    finally:
        stop_local_superlink(ray_dir / "flwr", ray_dir)


@pytest.mark.slow
def test_flwr_run_simulates_the_fedlora_apps(tmp_path: Path, ray_dir: Path) -> None:
    """The same components ``fedlora coordinator run`` deploys, under ``flwr run .`` with its
    local simulation SuperLink: one site per virtual SuperNode, a sealed round published."""
    config, out = _one_round_tiny(tmp_path), tmp_path / "run"
    log = _run_once(config, out, 3, ray_dir)
    assert "Starting local SuperLink" in log and (out / "metrics.jsonl").is_file(), log[-3000:]
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").open()]
    assert rounds == [0, 1], log[-3000:]
    manifest = json.loads((out / "registry/shared/v0001/manifest.json").read_text())
    assert manifest["version"] == manifest["round"] == 1
    assert manifest["cohort"] == ["site-0", "site-1", "site-2"]
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["site-0", "site-1", "site-2"]
    assert (out / "keys" / "site-2.key").is_file()  # sealed: keys made as simulate makes them


@pytest.mark.slow
def test_flwr_run_names_a_missing_config(tmp_path: Path, ray_dir: Path) -> None:
    """``flwr run --stream`` exits 0 when the run fails: the message must be in its output."""
    missing, out = tmp_path / "missing.toml", tmp_path / "run"
    log = _run_once(missing, out, 1, ray_dir)
    assert f"run config 'config' = '{missing}': {missing} is not a file" in log, log[-3000:]
    assert not out.exists()
