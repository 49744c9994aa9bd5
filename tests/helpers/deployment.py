"""A deployment on 127.0.0.1 made of real ``fedlora`` processes, and the process bookkeeping
that stops every one of them (``tests/test_e2e_loopback.py``, ``tests/test_e2e_resilience.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[19])


def process_tree(pid: int) -> list[tuple[int, int]]:
    """``pid`` and its live descendants as (pid, start time), parents first.

    Flower starts some children in a session of their own (the SuperLink's SuperExec, which
    runs the ServerApp), so the process group misses them; the parent links do not.
    """
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    root = _proc_stat(pid)
    tree = [] if root is None else [(pid, root[2])]
    for parent, _ in tree:  # grows while it is walked: breadth first
        tree.extend(children.get(parent, []))
    return tree


def alive(tree: list[tuple[int, int]]) -> list[int]:
    """The pids of a ``process_tree`` snapshot still running (not recycled, not zombies)."""
    running = []
    for pid, started in tree:
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == started and stat[0] != "Z":
            running.append(pid)
    return running


def kill_tree(tree: list[tuple[int, int]], sig: int = signal.SIGKILL) -> None:
    """Signal every process of a ``process_tree`` snapshot that still runs."""
    for pid in alive(tree):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class Deployment:
    root: Path
    port: int  # the SuperLink (Fleet, Control, Runtime APIs): internal
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    named: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    public_port: int | None = None  # the proxy, when the coordinator runs one

    @property
    def site_port(self) -> int:
        """Where sites (and outsiders) connect."""
        return self.public_port or self.port

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Path:
        """Start a command in its own process group; its output goes to ``<name>.log``."""
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(args),
                cwd=self.root,
                env=env or self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        self.named[name] = proc
        return log

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` and every process it started (a crash: no clean shutdown)."""
        proc = self.named.pop(name)
        tree = process_tree(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        kill_tree(tree)
        proc.wait(timeout=30)
        self.procs.remove(proc)
        wait_for(lambda: not alive(tree), 30, f"every process of {name} to exit")

    def fedlora(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "fedlora"), *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        trees = [process_tree(proc.pid) for proc in self.procs]
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            # The group also holds flwr-serverapp / flwr-clientapp children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for tree in trees:  # children in a session of their own (the SuperLink's SuperExec)
            kill_tree(tree)
        self.procs.clear()
        self.named.clear()


def site_toml(
    site: str,
    index: int,
    port: int,
    coordinator_port: int,
    model_seed: int = 0,
    groups: list[str] | None = None,
) -> str:
    declared = "" if groups is None else f"groups = {json.dumps(groups)}\n"
    return f"""\
[site]
id = "{site}"
keys = "keys/sites/{site}"
index = {index}
{declared}
[coordinator]
address = "127.0.0.1:{coordinator_port}"

[model]
name = "tiny-llama"
device = "cpu"
seed = {model_seed}

[data]
path = "{site}.jsonl"
format = "instruction"
holdout = 0.2

[supernode]
port = {port}

[resources]
cpu-threads = 1
"""
