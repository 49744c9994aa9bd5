"""The Flower apps' run config (``[tool.flwr.app.config]``): a deployed run or a simulation.

The one place where ``flwr run`` of the same app components (``server.deploy_app``,
``client.deploy_app``) splits into the two:

- ``fedlora coordinator run`` submits a **deployed** run: ``config``, ``out`` and ``keys`` are
  absolute paths on the coordinator, ``keys`` its keys folder (``fedlora keys init``).
- ``flwr run .`` with ``keys`` empty (pyproject.toml's default) runs a **simulation** in Flower's
  simulation runtime: the keys are made in the run folder as ``fedlora simulate`` makes them,
  and virtual SuperNode ``partition-id`` i is site ``site-<i>``.

A simulation's relative paths are relative to the working directory of Flower's simulation
process, which is the folder where ``flwr run`` started the local SuperLink (the repository).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

# Keys of the app's run config (pyproject.toml [tool.flwr.app.config]).
KEY_CONFIG = "config"
KEY_OUT = "out"
KEY_KEYS = "keys"

# A simulation's run folder when ``out`` is empty: <cwd>/runs/flwr-<Flower's run id>.
RUNS_FOLDER = "runs"
# Inside a simulation's run folder: the keys (coordinator and every virtual site) and each
# virtual site's own store (what a deployed site keeps on its machine).
KEYS_FOLDER = "keys"
SITES_FOLDER = "sites"


@dataclass(frozen=True)
class SimulatedRun:
    """A ``flwr run .`` simulation: the fedlora config and the run folder, both absolute."""

    config: Path
    out: Path

    @property
    def keys(self) -> Path:
        return self.out / KEYS_FOLDER

    @property
    def sites(self) -> Path:
        return self.out / SITES_FOLDER


def simulated_run(run_config: Mapping[str, object], run_id: int) -> SimulatedRun | None:
    """The simulation ``run_config`` asks for; None for a deployed run (``keys`` set).

    Raises ``ConfigError`` when ``config`` is empty or names no file.
    """
    if str(run_config.get(KEY_KEYS, "")):
        return None
    cwd = Path(os.getcwd())
    name = str(run_config.get(KEY_CONFIG, ""))
    if not name:
        raise ConfigError(
            f"run config {KEY_CONFIG!r} is empty: name a fedlora run config (TOML), e.g. "
            "flwr run . --run-config \"config='examples/tiny.toml'\""
        )
    config = cwd / name
    if not config.is_file():
        where = "" if Path(name).is_absolute() else f" (relative to {cwd}, where Flower runs)"
        raise ConfigError(
            f"run config {KEY_CONFIG!r} = {name!r}: {config} is not a file{where}; name an "
            "existing fedlora run config (TOML), an absolute path if relative ones resolve "
            "elsewhere"
        )
    out_name = str(run_config.get(KEY_OUT, ""))
    out = cwd / (out_name or f"{RUNS_FOLDER}/flwr-{run_id}")
    return SimulatedRun(config, out)
