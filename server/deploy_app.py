"""The ServerApp that ``flwr run`` starts: a deployed coordinator, or a ``flwr run .`` simulation.

A deployed run (``fedlora coordinator run``): the run config (``[tool.flwr.app.config]`` in
pyproject.toml, set by ``flwr run --run-config``) names the fedlora run config file, the run
directory and the coordinator's keys folder, all absolute paths on the coordinator. A run
directory that holds a checkpoint is resumed from its last completed round, so resubmitting
after a coordinator restart finishes the run.

A simulation (``keys`` empty; ``common.app_run_config`` tells the two apart): the keys are made
in a fresh run folder, as ``fedlora simulate`` makes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.allow_list import load_allow_list
from common.app_run_config import KEY_CONFIG, KEY_KEYS, KEY_OUT, SimulatedRun, simulated_run
from common.config import RunConfig, load_config
from common.errors import ConfigError
from common.instructions import instruction_key_path
from common.keys import COORDINATOR_KEY_NAME, load_coordinator_private, load_site_private
from common.progress import print_message
from common.roster import ROSTER_FILE
from server.checkpoint import CHECKPOINT_FILE
from server.federation import prepare, run_federation
from server.rundir import RunDirLock, check_start
from server.simulation_keys import provision_keys
from server.strategy import Sealing

ALLOW_LIST_NAME = "allow-list.json"


@dataclass(frozen=True)
class DeployedRun:
    config: Path  # the fedlora run config (TOML)
    out: Path  # the run directory
    keys: Path | None  # coordinator keys folder: coordinator.key, allow-list.json

    @classmethod
    def from_run_config(cls, run_config: dict[str, object]) -> DeployedRun:
        values = {k: str(run_config.get(k, "")) for k in (KEY_CONFIG, KEY_OUT, KEY_KEYS)}
        for key in (KEY_CONFIG, KEY_OUT):
            if not values[key] or not Path(values[key]).is_absolute():
                raise ConfigError(
                    f"run config {key!r} = {values[key]!r}: expected an absolute path on the "
                    "coordinator (submit runs with `fedlora coordinator run`)"
                )
        keys = Path(values[KEY_KEYS]) if values[KEY_KEYS] else None
        return cls(Path(values[KEY_CONFIG]), Path(values[KEY_OUT]), keys)


def load_sealing(cfg: RunConfig, keys: Path | None) -> Sealing | None:
    """The coordinator's envelope key and allow-list: the run config's, else the keys folder's."""
    if cfg.privacy.mode == "none":
        return None  # sealed opens envelopes; secure-sum checks adverts against the allow-list
    key = cfg.privacy.coordinator_key or (keys / COORDINATOR_KEY_NAME if keys else None)
    allow = cfg.privacy.allow_list or (keys / ALLOW_LIST_NAME if keys else None)
    if key is None or allow is None:
        raise ConfigError(
            f"privacy.mode = {cfg.privacy.mode!r} needs privacy.coordinator-key and "
            "privacy.allow-list "
            "(or the coordinator's keys folder)"
        )
    instruction = instruction_key_path(key)
    if not instruction.is_file():
        raise ConfigError(
            f"the coordinator's instruction key {instruction} is missing (sites refuse "
            "unsigned instructions); `fedlora keys init` writes it, and `fedlora keys "
            "add-site` adds it to an older keys folder"
        )
    roster_path = key.parent / ROSTER_FILE
    if cfg.privacy.mode == "secure-sum" and not roster_path.is_file():
        raise ConfigError(
            f"privacy.mode = 'secure-sum' needs the signed site roster {roster_path} (sites check "
            "their neighbours' keys against it); `fedlora keys add-site` writes it"
        )
    roster = roster_path.read_bytes() if roster_path.is_file() else None
    return Sealing(
        load_coordinator_private(key),
        load_allow_list(allow),
        load_site_private(instruction),
        roster,
    )


def run_deployed(grid: Grid, run: DeployedRun) -> None:
    """Run, or resume from its checkpoint, the federation ``run`` names."""
    cfg = load_config(run.config)
    resume = (run.out / CHECKPOINT_FILE).is_file()
    check_start(run.out, resume)
    with RunDirLock(run.out):
        sealing = load_sealing(cfg, run.keys)
        if resume:
            print_message(f"resuming the run in {run.out} from its checkpoint")
        coord = prepare(cfg, run.out, sealing, deployed=True)
        run_federation(grid, coord, resume=resume)


# Flower registers a simulation's virtual SuperNodes in one loop, just after it starts the
# ServerApp's thread (which first imports the app, seconds): how long to wait for them.
VIRTUAL_NODES_SECONDS = 30.0


def count_virtual_nodes(grid: Grid, timeout: float = VIRTUAL_NODES_SECONDS) -> int:
    """The number of a simulation's SuperNodes, once two looks 0.5 s apart agree."""
    deadline, seen = time.monotonic() + timeout, -1
    while True:
        count = len(list(grid.get_node_ids()))
        if (count and count == seen) or time.monotonic() > deadline:
            return count
        seen = count
        time.sleep(0.5)


def run_simulated(grid: Grid, run: SimulatedRun) -> None:
    """Run the simulation ``run`` names in a fresh run folder: one site per SuperNode."""
    cfg = load_config(run.config)
    check_start(run.out, resume=False)
    nodes = count_virtual_nodes(grid)
    if nodes != cfg.federation.sites:  # else it would wait federation.round-timeout for them
        raise ConfigError(
            f"this simulation has {nodes} SuperNodes but {run.config} has federation.sites = "
            f"{cfg.federation.sites}; run flwr run . --federation-config "
            f'"num-supernodes={cfg.federation.sites}"'
        )
    print_message(f"flwr run simulation of {run.config}: {nodes} sites, output {run.out}")
    with RunDirLock(run.out):
        coord = prepare(cfg, run.out, provision_keys(cfg, run.out))
        run_federation(grid, coord)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    simulation = simulated_run(context.run_config, context.run_id)
    if simulation is not None:
        run_simulated(grid, simulation)
    else:
        run_deployed(grid, DeployedRun.from_run_config(dict(context.run_config)))
