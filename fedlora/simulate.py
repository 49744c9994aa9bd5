"""Run a whole federation on one machine with Flower's simulation runtime (Ray backend).

The coordinator (ServerApp) runs in this process; each virtual site's ClientApp runs in a Ray
worker with ``simulation.cpus-per-site`` cores. The apps are built from the parsed config, so
nothing is packaged and no data leaves the repository.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from client.app import make_client_app
from common.config import RunConfig
from common.progress import print_message
from server.app import make_server_app
from server.federation import prepare
from server.rundir import RunDirLock, check_start

logger = logging.getLogger(__name__)

# Flower and Hugging Face settings every run needs on an offline machine (FLOWER.md).
_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}


def prepare_environment(out_dir: Path) -> None:
    """Set the offline/no-telemetry variables and private Flower/Ray folders for this run."""
    for key, value in _ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    scratch = Path(tempfile.mkdtemp(prefix="fedlora-"))
    os.environ.setdefault("FLWR_HOME", str(scratch / "flwr"))
    # Ray's socket paths must stay short (AF_UNIX limit of 107 bytes), so not under out_dir.
    os.environ.setdefault("RAY_TMPDIR", str(scratch / "ray"))
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {
            "num_cpus": min(cfg.simulation.cpus_per_site, cpus),
            "num_gpus": cfg.simulation.gpus_per_site,
        },
        "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": True},
    }


def simulate(cfg: RunConfig, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Prepare the coordinator, run (or resume) all rounds, return ``summary.json``."""
    prepare_environment(out_dir)
    from flwr.simulation import run_simulation  # after the environment is set

    print_message(
        f"[bold]fedlora simulate[/]: {cfg.federation.sites} sites, "
        f"{cfg.federation.rounds} rounds, model {cfg.model.name}, output {out_dir}"
    )
    check_start(out_dir, resume)
    with RunDirLock(out_dir):
        coord = prepare(cfg, out_dir)
        run_simulation(
            server_app=make_server_app(coord, resume=resume),
            client_app=make_client_app(cfg),
            num_supernodes=cfg.federation.sites,
            backend_config=backend_config(cfg),
        )
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the federation ended without writing {summary_path}; see the log")
    summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    return summary
