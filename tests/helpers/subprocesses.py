"""What the tests that run ``fedlora`` as a real process share: the command runner, how far a
run got, and the cleanup that leaves no Ray process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
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
    # Ray daemons may have left the group; they carry the session folder on their command line.
    subprocess.run(["pkill", "-9", "-f", str(ray_dir)], check=False)
