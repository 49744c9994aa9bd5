"""Ctrl-C and SIGTERM stop a real ``fedlora simulate`` cleanly, and ``--resume`` finishes it.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group; a service manager or
``kill`` sends SIGTERM, here to the command alone. Either way the command exits 130 within
seconds with one line saying how to resume, no traceback, no process of its session left, no
scratch folder and no half-written file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.in_process import IN_PROCESS
from tests.helpers.subprocesses import (
    kill_everything,
    rounds_done,
    start_job,
    wait_session_empty,
)

pytestmark = pytest.mark.slow

ROUNDS = 4  # the signal comes once round 1 is recorded; 2 to 3 rounds are left to resume
SETTINGS = [f"federation.rounds={ROUNDS}", "train.local-steps=2"]
ARGS = ["examples/tiny.toml", *(arg for item in SETTINGS for arg in ("--set", item))]
STOP_SECONDS = 30  # the target is 5 s; this leaves room for a loaded test machine


def _start(
    out: Path, tmp_path: Path, ray_dir: Path, log: Path, resume: bool = False
) -> subprocess.Popen[bytes]:
    """The interrupted run starts (and must stop) its own Ray; the resumed one, never signalled,
    runs on the in-process runtime (``simulation.backend`` is not part of the config digest)."""
    args = [
        "simulate",
        *ARGS,
        "--out",
        str(out),
        *(["--resume", "--set", IN_PROCESS] if resume else []),
    ]
    return start_job(args, tmp_path, ray_dir, log)


@pytest.mark.parametrize("how", ["sigint-to-group", "sigterm-to-process"])
def test_interrupt_stops_cleanly_and_resume_finishes(
    tmp_path: Path, ray_dir: Path, how: str
) -> None:
    out, log = tmp_path / "run", tmp_path / "interrupted.log"
    proc = _start(out, tmp_path, ray_dir, log)
    try:
        deadline = time.monotonic() + 300
        while rounds_done(out) < 1:
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.05)
        if how == "sigint-to-group":  # what a terminal's Ctrl-C does
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        rc = proc.wait(timeout=STOP_SECONDS)
        stopped_after = time.monotonic() - sent
        left = wait_session_empty(proc.pid, 20)
    finally:
        kill_everything(proc, ray_dir)
    output = log.read_text(errors="replace")
    assert rc == 130, output[-3000:]
    assert stopped_after < STOP_SECONDS
    assert "Traceback" not in output
    hints = [line for line in output.splitlines() if "--resume" in line]
    assert len(hints) == 1, output[-3000:]
    assert output.splitlines()[-1] == hints[0]
    done = rounds_done(out)
    assert 1 <= done < ROUNDS, "the run ended before the signal: nothing was interrupted"
    assert f"interrupted after round {done}; resume with: fedlora simulate" in hints[0]
    assert hints[0].endswith(f"--out {out} --set {SETTINGS[0]} --set {SETTINGS[1]} --resume")
    assert not left, f"processes of the run's session still alive: {left}"
    assert not list((tmp_path / "tmp").glob("fedlora-*")), "scratch folder left behind"
    half_written = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name[:2] == ".v"]
    assert not half_written

    resumed = _start(out, tmp_path, ray_dir, tmp_path / "resumed.log", resume=True)
    try:
        assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        kill_everything(resumed, ray_dir)
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(ROUNDS + 1))
    assert f"round {ROUNDS}/{ROUNDS}, elapsed" in (tmp_path / "resumed.log").read_text()
