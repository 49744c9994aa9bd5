"""``fedlora site start`` as a process: worker socket, SuperNode child, signals, exit code.

A real daemon and a real ``flower-supernode``, pointed at a port where no coordinator listens
(the SuperNode keeps retrying); the run itself is covered by ``tests/test_e2e_loopback.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
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


def test_daemon_serves_a_private_socket_and_passes_sigterm_to_its_supernode(
    tmp_path: Path,
) -> None:
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
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"))
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
    sock = tmp_path / "flwr" / "fedlora-site-a" / "worker.sock"
    try:
        deadline = time.monotonic() + 120
        while not (_children(daemon.pid) and sock.exists()):
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        supernode = _children(daemon.pid)
        cmdline = Path(f"/proc/{supernode[0]}/cmdline").read_bytes().split(b"\0")
        assert any(f'site-worker="{sock.resolve()}"'.encode() in part for part in cmdline)
        daemon.send_signal(signal.SIGTERM)  # to the daemon only: it passes it on
        code = daemon.wait(timeout=60)
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
    # The SuperNode's code: 0 once its handler stops it gracefully, 128 + 15 if SIGTERM came
    # while it was still starting. Either way it got the signal (else it retries forever).
    assert code in (0, 128 + signal.SIGTERM), log.read_text()
    assert not sock.exists()
    assert not any(Path(f"/proc/{pid}").exists() for pid in supernode)
