"""The run directory: one coordinator at a time; fresh runs need an empty folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.rundir import RunDirError, RunDirLock, check_start


def test_second_coordinator_is_refused(tmp_path: Path) -> None:
    with RunDirLock(tmp_path), pytest.raises(RunDirError, match="in use by another coordinator"):
        RunDirLock(tmp_path).acquire()
    RunDirLock(tmp_path).acquire().release()  # free again once the first one is done


def test_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from server.rundir import RunDirLock;"
            f"RunDirLock(Path({str(tmp_path)!r})).acquire(); print('held', flush=True);"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock with the process
        holder.wait()
    RunDirLock(tmp_path).acquire().release()


def test_fresh_run_refuses_a_used_folder(tmp_path: Path) -> None:
    check_start(tmp_path, resume=False)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="--resume"):
        check_start(tmp_path, resume=False)
    check_start(tmp_path, resume=True)


def test_resume_needs_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="does not exist, so there is nothing to resume"):
        check_start(tmp_path / "missing", resume=True)
    with pytest.raises(RunDirError, match="holds no run, so there is nothing to resume"):
        check_start(tmp_path, resume=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("resume", [False, True])
def test_a_file_is_no_run_folder(tmp_path: Path, resume: bool) -> None:
    (tmp_path / "out").write_text("")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        check_start(tmp_path / "out", resume=resume)
