"""``flwr run .`` against Flower's local simulation SuperLink, and stopping that SuperLink.

``flwr run`` starts the local SuperLink detached (its own session), and it keeps running after
the command returns: a test finds it by the database path under its own ``FLWR_HOME`` and
stops it, with everything it started, by process id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers.deployment import REPO, alive, free_port, kill_tree, process_tree, wait_for


def local_env(flwr_home: Path, ray_dir: Path) -> dict[str, str]:
    """``fedlora``'s Flower environment with a local SuperLink of the test's own: its home,
    Ray folder and two free ports (another local SuperLink on this machine is never used)."""
    from fedlora.deploy_flower import flower_env

    return flower_env(
        flwr_home,
        {
            "RAY_TMPDIR": str(ray_dir),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
        },
    )


def flwr_run(*args: str, env: dict[str, str], timeout: float = 240) -> str:
    """``flwr run . --stream ARGS`` in the repository; stdout and stderr together.

    ``flwr run --stream`` exits 0 even when the run fails: callers check the output.
    """
    done = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "run", ".", "--stream", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
    return found


def stop_local_superlink(flwr_home: Path, ray_dir: Path) -> None:
    """SIGKILL the local SuperLink of ``flwr_home`` with its children, and the Ray processes
    of ``ray_dir`` (Ray's daemons may have left the simulation's process tree)."""
    database = str(flwr_home / "local-superlink" / "state.db")
    trees = [process_tree(pid) for pid in _pids_naming(database)]
    for tree in trees:
        kill_tree(tree)
    for pid in _pids_naming(str(ray_dir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(tree) for tree in trees), 30, "the local SuperLink to exit")
