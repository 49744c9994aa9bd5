"""Crash-safe file writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader sees either the old file or the complete new one, never a torn write. Every write
here holds ``WRITES``; an interrupted simulation takes that lock and keeps it before it exits, so
that the exit never leaves a temp file or a torn line behind (``fedlora/interrupt.py``).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# Reentrant: a whole write (a registry version) is made of smaller ones.
WRITES = threading.RLock()


def whole_write(func: Callable[P, R]) -> Callable[P, R]:
    """Run ``func`` under ``WRITES``: an exit that holds the lock never cuts it half-way."""

    @wraps(func)
    def locked(*args: P.args, **kwargs: P.kwargs) -> R:
        with WRITES:
            return func(*args, **kwargs)

    return locked


def hold_writes(timeout_s: float) -> bool:
    """Take ``WRITES`` and keep it: from now on no write of this process starts, and the one
    in progress (if any) has finished. False if it did not finish within ``timeout_s``."""
    return WRITES.acquire(timeout=timeout_s)


def fsync_path(path: Path) -> None:
    """Persist a file's data, or a folder's entries (a rename is durable only once its folder
    is synced): the one fsync helper."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path  # the name its many callers use for a folder


@whole_write
def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


@whole_write
def append_jsonl(path: Path, value: Any) -> None:
    """Append one JSON line and fsync it (metrics and audit logs survive a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(value, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
