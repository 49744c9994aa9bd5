"""``fedlora site start``: check a site, then run its worker and SuperNode (the ClientApp).

fedlora site start --config site.toml [--expect-fingerprint HEX] [--check]

Before anything connects, the site checks what would otherwise fail in round 1: the keys
bundle (SuperNode auth key, envelope signing key, coordinator public key, CA certificate), the
data file (read and split), and the base model (loaded and fingerprinted; with
``--expect-fingerprint`` it must match). Then the daemon serves the site's resident worker
(model and data stay loaded) on a private Unix socket and runs ``flower-supernode`` as its
child, which keeps reconnecting when the coordinator restarts; SIGTERM and SIGINT are passed
on to it, and the daemon exits with its exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from rich.markup import escape

from common.errors import FedloraError
from common.keys import (
    COORDINATOR_KEY_NAME,
    PRIVATE_SUFFIX,
    KeyMaterialError,
    load_coordinator_public,
    load_site_private,
    public_path_for,
)
from common.model_names import looks_like_dataset_name
from common.progress import console, print_message
from common.site_config import SiteConfig, load_site_config
from fedlora.app_pin import write_task_shims
from fedlora.deploy_flower import executable, flower_env
from fedlora.deploy_keys import NODE_KEY
from fedlora.help_text import plain

if TYPE_CHECKING:
    from client.deploy_app import PreloadedBase


class SiteCheckError(FedloraError):
    """The site cannot start: its data, keys or base model is missing or wrong."""


@dataclass(frozen=True)
class SiteCheck:
    train_examples: int
    heldout_examples: int
    fingerprint: str


def check_keys(cfg: SiteConfig) -> None:
    """Every key file the site needs exists, is private where it must be, and parses."""
    bundle = cfg.site.keys
    if not bundle.is_dir():
        raise SiteCheckError(f"site.keys: keys bundle {bundle} not found")
    node_key = bundle / NODE_KEY
    try:
        data = node_key.read_bytes()
    except OSError:
        raise SiteCheckError(f"site.keys: SuperNode auth key {node_key} not found") from None
    if node_key.stat().st_mode & 0o077:
        raise SiteCheckError(f"{node_key} is readable by group or others; chmod 600 it")
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SiteCheckError(f"{node_key} is not an OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SiteCheckError(f"{node_key}: Flower needs an ECDSA SuperNode key")
    try:
        load_site_private(bundle / f"{cfg.site.id}{PRIVATE_SUFFIX}")
        load_coordinator_public(public_path_for(bundle / COORDINATOR_KEY_NAME))
    except KeyMaterialError as exc:
        raise SiteCheckError(f"site.keys: {exc}") from None
    try:
        x509.load_pem_x509_certificate(cfg.root_certificates.read_bytes())
    except (OSError, ValueError):
        raise SiteCheckError(
            f"coordinator.root-certificates: {cfg.root_certificates} is not a readable "
            "PEM certificate"
        ) from None


def check_site(cfg: SiteConfig, expect_fingerprint: str | None = None) -> SiteCheck:
    """Keys, then data, then the base model; a ``SiteCheckError`` names what is wrong."""
    return inspect_site(cfg, expect_fingerprint)[0]


def inspect_site(
    cfg: SiteConfig, expect_fingerprint: str | None = None
) -> tuple[SiteCheck, PreloadedBase]:
    """``check_site``, also returning the base model it loaded (the worker's first runtime)."""
    from client.deploy_app import PreloadedBase, load_site_data  # torch/transformers: only here
    from common.models import load_base

    check_keys(cfg)
    if not cfg.data.path.exists() and not looks_like_dataset_name(str(cfg.data.path)):
        raise SiteCheckError(f"data.path: {cfg.data.path} not found")  # a file, folder or hub name
    data, _, labels = load_site_data(cfg, None)
    base = load_base(cfg.model, num_labels=labels or None)
    expected = expect_fingerprint or cfg.site.expect_fingerprint
    if expected is not None and expected != base.fingerprint:
        raise SiteCheckError(
            f"base model fingerprint mismatch: expected {expected}, but model.name = "
            f"{cfg.model.name!r} here is {base.fingerprint}; install the coordinator's base "
            "model (same weights, config and tokenizer)"
        )
    check = SiteCheck(len(data.train), len(data.heldout), base.fingerprint)
    return check, PreloadedBase(base, labels or None)


def supernode_command(cfg: SiteConfig, config_path: Path, worker: Path | None = None) -> list[str]:
    """``flower-supernode`` with TLS, the SuperNode auth key, the site config and worker paths."""
    node = cfg.supernode
    node_config = f"site-config={json.dumps(str(config_path.resolve()))}"
    if worker is not None:
        node_config += f" site-worker={json.dumps(str(worker))}"
    command = [
        executable("flower-supernode"),
        "--superlink",
        cfg.coordinator.address,
        "--root-certificates",
        str(cfg.root_certificates),
        "--auth-supernode-private-key",
        str(cfg.site.keys / NODE_KEY),
        "--node-config",
        node_config,
        "--port",
        str(node.port),
    ]
    if node.max_retries is not None:
        command += ["--max-retries", str(node.max_retries)]
    if node.max_wait_time is not None:
        command += ["--max-wait-time", str(node.max_wait_time)]
    if node.health_port is not None:
        command += ["--health-server-address", f"127.0.0.1:{node.health_port}"]
    return command


def site_env(cfg: SiteConfig) -> dict[str, str]:
    extra: dict[str, str] = {}
    if cfg.resources.cpu_threads is not None:
        threads = str(cfg.resources.cpu_threads)
        extra |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if cfg.resources.cuda_visible_devices is not None:
        extra["CUDA_VISIBLE_DEVICES"] = cfg.resources.cuda_visible_devices
    return flower_env(extra=extra)


def flwr_home() -> Path:
    """Flower's home folder, as the SuperNode resolves it: ``$FLWR_HOME``, else ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def task_shim_folder(site_id: str) -> Path:
    """Where the site daemon writes its task commands (``fedlora.app_pin``)."""
    return flwr_home() / "fedlora-tasks" / site_id


def _wait_forwarding_signals(child: subprocess.Popen[bytes]) -> int:
    """Wait for ``child``, passing SIGTERM and SIGINT on; its exit code (128 + N if killed)."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def run_daemon(cfg: SiteConfig, config_path: Path, preloaded: PreloadedBase) -> int:
    """Serve the site's worker, run the SuperNode as a child until it exits; its exit code.

    The SuperNode stays in the daemon's process group, so stopping the group (a service
    manager, ``kill -- -PID``) stops both; it also gets SIGTERM if the daemon alone dies
    (``fedlora.parent_watch``); the socket is removed when the daemon exits.
    """
    from client.worker import SiteWorker, serve_worker, worker_socket_path

    socket_path = worker_socket_path(flwr_home(), cfg.site.id)
    with serve_worker(SiteWorker(cfg, preloaded), socket_path):
        print_message(f"site {cfg.site.id}: worker serving {socket_path}")
        command = supernode_command(cfg, config_path, socket_path)
        print_message(f"site {cfg.site.id}: starting the SuperNode → {cfg.coordinator.address}")
        watched = [sys.executable, "-m", "fedlora.parent_watch", str(os.getpid()), *command]
        env = site_env(cfg)
        # The SuperNode starts each task by name: the site's own commands come first on PATH,
        # so that only the installed ClientApp runs here (fedlora.app_pin).
        shims = write_task_shims(task_shim_folder(cfg.site.id))
        env["PATH"] = os.pathsep.join([str(shims), env["PATH"]])
        child = subprocess.Popen(watched, env=env)
        return _wait_forwarding_signals(child)


def start_site(config_path: Path, expect_fingerprint: str | None, check_only: bool) -> int:
    cfg = load_site_config(config_path)
    # Before torch is imported: the worker trains in this process.
    if cfg.resources.cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.resources.cuda_visible_devices
    if cfg.resources.cpu_threads is not None:
        threads = str(cfg.resources.cpu_threads)
        os.environ |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    result, preloaded = inspect_site(cfg, expect_fingerprint)
    print_message(
        f"site {cfg.site.id}: {result.train_examples} training / {result.heldout_examples} "
        f"held-out examples, base {cfg.model.name} fingerprint {result.fingerprint}"
    )
    if check_only:
        return 0
    return run_daemon(cfg, config_path, preloaded)


def add_site_parser(subparsers: Any) -> None:
    """Add ``site start`` to the ``fedlora`` sub-parsers."""
    parser = subparsers.add_parser(
        "site",
        help="the site daemon: check data, keys and base model, then run the SuperNode",
        description=plain(__doc__.split("\n\n")[2]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="site_command", required=True, metavar="COMMAND")
    start = sub.add_parser(
        "start",
        help="check the site, then run its SuperNode (foreground)",
        description="Check the keys bundle, the data file and the base model, then serve the "
        "site's worker and run flower-supernode as a child until it exits (SIGTERM and SIGINT "
        "are passed on). With --check, only the checks run.",
    )
    start.add_argument("--config", type=Path, required=True, help="site.toml")
    start.add_argument(
        "--expect-fingerprint", metavar="HEX", help="refuse unless the base model has this digest"
    )
    start.add_argument("--check", action="store_true", help="only run the checks, then exit")


def run_site(args: argparse.Namespace) -> int:
    try:
        return start_site(args.config, args.expect_fingerprint, args.check)
    except FedloraError as exc:
        console.print(f"[red]error[/]: {escape(str(exc))}", soft_wrap=True)
        return 2
