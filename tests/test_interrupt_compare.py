"""Ctrl-C stops a real ``fedlora compare`` and ``fedlora sweep`` cleanly, arm by arm, and the
command each prints goes on from there.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group. The command exits 130
within seconds with one line (which arm ran, what is finished, the command that goes on), no
traceback and no process of its session left; the arms already measured stay on disk and are
not measured again.

The commands run their federations on the in-process runtime (``IN_PROCESS``): what Ctrl-C
does to a Ray that fedlora started itself is ``tests/test_interrupt.py``'s to check.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from collections.abc import Callable
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

ROUNDS = 3
ARMS = "federated,local-only,centralized"
STOP_SECONDS = 30  # the target is a few seconds; this leaves room for a loaded test machine


def _interrupt(
    args: list[str], when: Callable[[], bool], tmp_path: Path, ray_dir: Path, log: Path
) -> tuple[int, str]:
    """Start ``fedlora ARGS``, send its process group SIGINT once ``when()`` holds; its exit
    code and output. Fails if it ends before, does not stop in time or leaves a process."""
    proc = start_job(args, tmp_path, ray_dir, log)
    try:
        deadline = time.monotonic() + 600
        while not when():
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the moment to interrupt never came"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=STOP_SECONDS)
        left = wait_session_empty(proc.pid, 20)
    finally:
        kill_everything(proc, ray_dir)
    output = log.read_text(errors="replace")
    assert rc == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not left, f"processes of the command's session still alive: {left}"
    assert not list((tmp_path / "tmp").glob("fedlora-*")), "scratch folder left behind"
    return rc, output


def _finish(args: list[str], tmp_path: Path, ray_dir: Path, log: Path) -> str:
    """Run ``fedlora ARGS`` to its end (exit code 0); its output."""
    proc = start_job(args, tmp_path, ray_dir, log)
    try:
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        kill_everything(proc, ray_dir)
    return log.read_text()


def _hint(output: str) -> tuple[str, list[str]]:
    """The one line that says how to go on (the last line), and its command's arguments."""
    hints = [line for line in output.splitlines() if "--resume" in line]
    assert len(hints) == 1 and output.splitlines()[-1] == hints[0], output[-3000:]
    command = shlex.split(hints[0].split("resume with: ", 1)[1])
    assert command[0] == "fedlora" and command[-1] == "--resume"
    return hints[0], command[1:]


def _half_written(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name[:2] == ".v"]


def test_compare_stops_per_arm_and_its_resume_command_finishes(
    tmp_path: Path, ray_dir: Path
) -> None:
    out = tmp_path / "compare"
    args = ["compare", "examples/tiny.toml", "--out", str(out), "--set",
            f"federation.rounds={ROUNDS}", "--set", IN_PROCESS, "--arms", ARMS]  # fmt: skip

    # 1. During the federated arm, after its first round.
    _, output = _interrupt(
        args, lambda: rounds_done(out / "federated") >= 1, tmp_path, ray_dir, tmp_path / "1.log"
    )
    line, resume = _hint(output)
    done = rounds_done(out / "federated")
    assert 1 <= done < ROUNDS, "the federated run ended before the signal"
    assert (
        f"interrupted during arm 'federated' after its round {done} (finished: no arm yet;" in line
    )
    assert resume == [*args, "--resume"]
    assert not _half_written(out)

    # 2. Its command resumes the federated run; stopped again in the next arm.
    federated_record, log = out / "arms" / "federated.json", tmp_path / "2.log"
    _, output = _interrupt(
        resume,
        lambda: "local-only site-0: round 1/" in log.read_text(errors="replace"),
        tmp_path,
        ray_dir,
        log,
    )
    line, again = _hint(output)
    assert "interrupted during arm 'local-only' (finished: federated;" in line
    assert again == resume
    assert rounds_done(out / "federated") == ROUNDS  # resumed to its end, not started again
    rounds = [
        json.loads(x)["round"] for x in (out / "federated/metrics.jsonl").read_text().splitlines()
    ]
    assert rounds == list(range(ROUNDS + 1))
    kept = federated_record.read_bytes()

    # 3. The same command finishes the rest and keeps the federated arm as it was measured.
    output = _finish(resume, tmp_path, ray_dir, tmp_path / "3.log")
    assert "federated: measured by the interrupted run" in output
    assert federated_record.read_bytes() == kept
    result = json.loads((out / "compare.json").read_text())
    assert sorted(result["arms"]) == ["centralized", "federated", "local-only"]
    assert result["arms"]["federated"] == json.loads(kept)["arm"]


def test_sweep_stops_in_a_setting_and_its_resume_command_finishes(
    tmp_path: Path, ray_dir: Path
) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "examples/tiny.toml", "--vary", "modules.shared.rank=2,4", "--out", str(out),
            "--set", "federation.rounds=2", "--set", IN_PROCESS]  # fmt: skip
    first, second = out / "modules.shared.rank=2", out / "modules.shared.rank=4"

    # Stopped in the second setting's federated arm: the first setting is finished.
    _, output = _interrupt(
        args, lambda: rounds_done(second / "federated") >= 1, tmp_path, ray_dir, tmp_path / "1.log"
    )
    line, resume = _hint(output)
    at = f"after its round {rounds_done(second / 'federated')}"
    assert f"interrupted in setting {second.name} during arm 'federated' {at} " in line
    assert f"(settings finished: {first.name};" in line
    assert resume == [*args, "--resume"]
    kept = (first / "compare.json").read_bytes()

    _finish(resume, tmp_path, ray_dir, tmp_path / "2.log")
    assert (first / "compare.json").read_bytes() == kept  # the finished setting is not run again
    result = json.loads((out / "sweep.json").read_text())
    assert [row["setting"] for row in result["rows"]] == [first.name, second.name]
    assert rounds_done(second / "federated") == 2
