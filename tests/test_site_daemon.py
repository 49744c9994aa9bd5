"""``fedlora site start`` as a process: worker socket, SuperNode child, signals, exit code.

A real daemon and a real ``flower-supernode``, pointed at a port where no coordinator listens
(the SuperNode keeps retrying); the run itself is covered by ``tests/test_e2e_loopback.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlora.deploy_keys import init_deployment

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(stat_line[1]) == pid and stat_line[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.fixture
def flwr_home() -> Iterator[Path]:
    """A short FLWR_HOME: the worker socket's path must fit in 104 bytes, and pytest's
    tmp_path (``/tmp/pytest-of-<user>/pytest-<n>/popen-gw<k>/<test name>``) may not."""
    home = Path(tempfile.mkdtemp(prefix="fl-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def _start_daemon(tmp_path: Path, home: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A site daemon for site "a" against a dead coordinator port; once its SuperNode runs."""
    init_deployment(tmp_path / "keys", ["a"], ["localhost"])
    lines = (REPO / "examples/data/dolly-tiny.jsonl").read_text().splitlines()[:20]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    (tmp_path / "site.toml").write_text(
        '[site]\nid = "a"\nkeys = "keys/sites/a"\n\n'
        f'[coordinator]\naddress = "127.0.0.1:{dead}"\n\n'
        '[model]\nname = "tiny-llama"\ndevice = "cpu"\n\n'
        '[data]\npath = "a.jsonl"\nformat = "instruction"\n'
    )
    env = dict(os.environ, FLWR_HOME=str(home))
    log = tmp_path / "site.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [str(BIN / "fedlora"), "site", "start", "--config", "site.toml"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sock = home / "fedlora-site-a" / "worker.sock"
    deadline = time.monotonic() + 120
    while not (_supernode(daemon.pid) and sock.exists()):
        if daemon.poll() is not None or time.monotonic() > deadline:
            _stop(daemon)
            pytest.fail(log.read_text())
        time.sleep(0.5)
    return daemon, sock, log


def _supernode(daemon: int) -> list[int]:
    """The daemon's child once it runs flower-supernode (the launcher execs into it)."""
    found = []
    for pid in _children(daemon):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and b"flower-supernode" in argv[1]:
            found.append(pid)
    return found


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()


def test_daemon_serves_a_private_socket_and_passes_sigterm_to_its_supernode(
    tmp_path: Path, flwr_home: Path
) -> None:
    daemon, sock, log = _start_daemon(tmp_path, flwr_home)
    try:
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        supernode = _supernode(daemon.pid)
        cmdline = Path(f"/proc/{supernode[0]}/cmdline").read_bytes().split(b"\0")
        assert any(f'site-worker="{sock.resolve()}"'.encode() in part for part in cmdline)
        daemon.send_signal(signal.SIGTERM)  # to the daemon only: it passes it on
        code = daemon.wait(timeout=60)
    finally:
        _stop(daemon)
    # The SuperNode's code: 0 once its handler stops it gracefully, 128 + 15 if SIGTERM came
    # while it was still starting. Either way it got the signal (else it retries forever).
    assert code in (0, 128 + signal.SIGTERM), log.read_text()
    assert not sock.exists()
    assert not any(Path(f"/proc/{pid}").exists() for pid in supernode)


def test_supernode_stops_when_the_daemon_alone_is_killed(tmp_path: Path, flwr_home: Path) -> None:
    # The OOM killer takes the daemon only, not its process group: the SuperNode must not
    # keep running without its worker (fedlora.parent_watch: PR_SET_PDEATHSIG).
    daemon, _, log = _start_daemon(tmp_path, flwr_home)
    supernode = _supernode(daemon.pid)
    try:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in supernode):
            assert time.monotonic() < deadline, f"SuperNode {supernode} outlived its daemon"
            time.sleep(0.5)
    finally:
        for pid in supernode:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "starting the SuperNode" in log.read_text()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, already dead, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"
