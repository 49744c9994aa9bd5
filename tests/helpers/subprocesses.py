"""What the tests that run ``fedlora`` as a real process share: the command runner, a command
started as a terminal job (to be sent signals), how far a run got, the processes a command's
session still has, and the cleanup that leaves no Ray process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fedlora(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m fedlora.cli ARGS`` in the repository, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=env,
    )


def ray_env(ray_dir: Path, own_ray: bool = True) -> dict[str, str]:
    """This process's environment with Ray and Flower in ``ray_dir``. ``own_ray``: a command
    started with it starts (and on a signal stops) its own Ray, rather than using the test
    process's cluster (``tests/helpers/shared_ray.py``)."""
    env = dict(os.environ)
    if own_ray:
        env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = str(ray_dir)
    env["FLWR_HOME"] = str(ray_dir / "flwr")
    return env


def job_env(tmp_path: Path, ray_dir: Path, own_ray: bool = True) -> dict[str, str]:
    """The environment of a command started as a job (``ray_env``), its scratch folders under
    ``tmp_path/tmp`` (where one left behind would show)."""
    env = ray_env(ray_dir, own_ray)
    env["PYTHONUNBUFFERED"] = "1"  # output in order, nothing held in a buffer
    env["TMPDIR"] = str(tmp_path / "tmp")
    Path(env["TMPDIR"]).mkdir(exist_ok=True)
    return env


def start_job(
    args: Sequence[str], tmp_path: Path, ray_dir: Path, log: Path, own_ray: bool = True
) -> subprocess.Popen[bytes]:
    """``python -m fedlora.cli ARGS`` as a terminal starts a job: its own process group and
    session, SIGINT handled; its output (both streams) goes to ``log``. ``own_ray``: see
    ``job_env``."""
    # A background job inherits SIGINT ignored, and so would the command (which then keeps
    # ignoring it, as it should): a handled SIGINT in this process is reset to the default in
    # the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with log.open("wb") as sink:
            return subprocess.Popen(
                [sys.executable, "-m", "fedlora.cli", *args],
                cwd=REPO,
                env=job_env(tmp_path, ray_dir, own_ray),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a terminal job has
            )
    finally:
        signal.signal(signal.SIGINT, previous)


def session_processes(sid: int) -> list[int]:
    """The processes still alive in session ``sid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                if os.getsid(int(entry.name)) == sid:
                    alive.append(int(entry.name))
    return alive


def wait_session_empty(sid: int, seconds: float) -> list[int]:
    """Wait up to ``seconds`` for session ``sid`` to have no process; those still alive."""
    deadline = time.monotonic() + seconds
    while (alive := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def rounds_done(out: Path) -> int:
    """The last round in ``out/metrics.jsonl`` (-1: none yet); a torn last line is skipped."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return -1
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return max((line["round"] for line in lines), default=-1)


def kill_everything(proc: subprocess.Popen[bytes], ray_dir: Path) -> None:
    """SIGKILL ``proc``'s process group and every Ray process of its ``ray_dir``."""
    with contextlib.suppress(ProcessLookupError):  # nothing left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_ray_processes(ray_dir)  # Ray daemons may have left the group


def kill_ray_processes(folder: Path) -> None:
    """SIGKILL every process of the Ray whose files are in ``folder``: each names it on its
    command line; its workers exit with their raylet."""
    subprocess.run(["pkill", "-9", "-f", str(folder)], check=False)
