"""How fedlora starts Flower's processes: executables, environment, the CLI's connection file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.errors import FedloraError

# Flower and Hugging Face settings every deployed process needs (FLOWER.md): no telemetry, no
# update check, no `uv sync` of the app's dependencies (torch!) per run, no hub access.
OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
CONNECTION = "fedlora"  # the connection name in $FLWR_HOME/config.toml


class DeployError(FedloraError):
    """A deployment process cannot start: missing files, a busy port, a refused command."""


def executable(name: str) -> str:
    """A Flower executable from this interpreter's environment (else from PATH)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found; install fedlora (it depends on flwr) first")
    return found


def flower_env(
    flwr_home: Path | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment for Flower processes: offline settings, this venv's bin first on PATH.

    SuperLink and SuperNode start ``flwr-serverapp`` / ``flwr-clientapp`` by name, so the
    folder of this interpreter must lead PATH.
    """
    env = dict(os.environ)
    for key, value in OFFLINE_ENVIRONMENT.items():
        env.setdefault(key, value)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def write_connection(flwr_home: Path, address: str, root_certificates: Path) -> None:
    """``$FLWR_HOME/config.toml`` with the TLS connection the ``flwr`` CLI uses."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = (
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f"address = {json.dumps(address)}\n"
        f"root-certificates = {json.dumps(str(root_certificates))}\n"
    )
    (flwr_home / "config.toml").write_text(text, encoding="utf-8")


def wait_for_port(address: str, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    """Wait until ``host:port`` accepts TCP connections (bounded by ``timeout`` seconds)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"the process serving {address} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise DeployError(f"nothing listens on {address} after {timeout:.0f} s") from None
            time.sleep(0.2)


def run_flwr(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """Run ``flwr ARGS``; its stdout, or a ``DeployError`` with what it printed."""
    try:
        done = subprocess.run(
            [executable("flwr"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeployError(f"`flwr {' '.join(args)}` did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise DeployError(f"`flwr {' '.join(args)}` failed: {output[-2000:]}")
    return done.stdout
