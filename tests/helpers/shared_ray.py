"""One Ray cluster per test process, shared by the simulations that run in it.

Starting Ray costs about 18 processes and 19 s of CPU (measured on this 2-core machine,
2026-12-07: `ray.init` then a sum of its processes' CPU time), which a simulation of the tiny
model then outweighs several times. The suite runs dozens of simulations, so each test process
starts one cluster (``ray start --head``) and points ``RAY_ADDRESS`` at it: Flower's Ray backend
then connects instead of starting Ray, and its ``ray.shutdown()`` at the end of a run only
disconnects (the run's actors end with its job). Running on an existing cluster is a supported
fedlora setting in its own right (``fedlora/simulate.py:backend_config``).

Commands that a test kills or interrupts keep their own local Ray (``job_env`` drops
``RAY_ADDRESS`` unless asked not to), so the default path, Ray started and stopped by fedlora
itself, stays tested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedlora.simulate import set_offline_environment
from tests.helpers.deployment import free_port

RAY = Path(sys.executable).parent / "ray"


def start_cluster(folder: Path) -> str:
    """Start a Ray head node whose files live in ``folder`` (short: socket paths); its address."""
    set_offline_environment()  # what fedlora sets before Ray starts, also for the cluster's workers
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    done = subprocess.run(
        [
            str(RAY),
            "start",
            "--head",
            f"--port={port}",
            f"--num-cpus={os.cpu_count() or 1}",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={folder}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        start_new_session=True,  # out of the test process's group: no test's cleanup reaches it
    )
    if done.returncode != 0:
        raise RuntimeError(f"ray start failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return f"127.0.0.1:{port}"
