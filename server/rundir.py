"""The coordinator's run directory: one coordinator at a time, fresh or explicitly resumed."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from common.errors import FedloraError

LOCK_FILE = ".lock"
# Files whose presence means the folder already holds (part of) a run.
RUN_MARKERS = ("metrics.jsonl", "registry", "checkpoint.safetensors")


class RunDirError(FedloraError):
    """The run directory is locked by another coordinator, or not in the expected state."""


class RunDirLock:
    """An exclusive ``flock`` on ``<run-dir>/.lock``, held while a coordinator runs.

    The kernel drops the lock when the process dies (also on SIGKILL), so a crashed
    coordinator never leaves the directory locked.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by another coordinator (lock {self.path}); "
                "stop it first or choose another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_MARKERS)


def check_start(run_dir: Path, resume: bool) -> None:
    """A fresh run needs an empty folder; ``resume`` needs one with a run in it.

    Checked before anything is written: a refused start leaves ``run_dir`` as it was.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a folder: choose another output folder")
    if resume and not holds_run(run_dir):
        what = "does not exist" if not run_dir.exists() else "holds no run"
        raise RunDirError(f"{run_dir} {what}, so there is nothing to resume; drop --resume")
    if not resume and holds_run(run_dir):
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
            "output folder"
        )
