"""Flower's Ray settings from a config: a Ray of the command's own, or the cluster that
``RAY_ADDRESS`` names (Ray refuses a core count from a client of an existing cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from fedlora.simulate import backend_config


def test_own_ray_gets_the_cores_and_a_cluster_is_not_told_them(
    monkeypatch: pytest.MonkeyPatch, examples_dir: Path
) -> None:
    cfg = load_config(examples_dir / "tiny.toml")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    own = backend_config(cfg)
    assert own["init_args"]["num_cpus"] >= 1
    assert own["client_resources"]["num_cpus"] == cfg.simulation.cpus_per_site
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    shared = backend_config(cfg)
    assert "num_cpus" not in shared["init_args"]
    assert shared["client_resources"] == own["client_resources"]
