"""The site daemon's resident worker: the site's model and data, served over a Unix socket.

Flower's SuperNode starts a fresh ClientApp process for every message; building a site there
(importing transformers and peft, reading the data, loading the base model) costs seconds to
minutes per message. ``fedlora site start`` therefore runs this worker for the life of the
daemon: it builds the site's ``SiteRuntime`` once per run plan and answers ``describe``,
``train`` and ``evaluate`` requests (``client.worker_wire``) from the per-message ClientApp
(``client.remote_site.RemoteSite``). One request runs at a time.

The socket is mode 0600 in a folder of mode 0700 owned by the site's user: only that user's
processes (the SuperNode's ClientApps) can connect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.deploy_app import PreloadedBase, build_runtime, runtime_key
from client.worker_wire import (
    KIND_DESCRIBE,
    KIND_EVAL,
    KIND_EVALUATE,
    KIND_SITE,
    KIND_STEP,
    KIND_TRAIN,
    KIND_UPDATE,
    Frame,
    SiteWorkerError,
    WorkerFrameError,
    error_header,
    field_of,
    recv_frame,
    send_frame,
)
from common.config import SitePlan
from common.errors import ConfigError, FedloraError
from common.site_config import SiteConfig

if TYPE_CHECKING:
    from client.site import SiteRuntime

logger = logging.getLogger(__name__)

SOCKET_NAME = "worker.sock"
# Seconds one socket read or write may block (a request frame, a reply frame): a client that
# connects and stalls must not hold a handler thread forever. Training time is not bounded.
IO_TIMEOUT = 120.0
# sun_path of a Unix socket address holds 108 bytes on Linux, 104 on macOS (with the NUL).
_MAX_SOCKET_PATH_BYTES = 103
_REQUEST_STATES = frozenset({"received"})


def worker_socket_path(flwr_home: Path, site_id: str) -> Path:
    """Where a site daemon serves its worker: ``<flwr_home>/fedlora-site-<id>/worker.sock``."""
    return flwr_home.resolve() / f"fedlora-site-{site_id}" / SOCKET_NAME


class SiteWorker:
    """The site's runtime for the current run plan, built once and kept."""

    def __init__(self, cfg: SiteConfig, preloaded: PreloadedBase | None = None) -> None:
        self.cfg = cfg
        self._preloaded = preloaded
        self._key: str | None = None
        self._runtime: SiteRuntime | None = None
        self._lock = threading.Lock()

    def runtime(self, plan: SitePlan) -> SiteRuntime:
        """The runtime for ``plan``; a plan of another run (module, labels) builds a new one.

        Only one is kept: each holds its own copy of the base model (gigabytes for an LLM).
        """
        key = runtime_key(plan)
        if self._runtime is None or key != self._key:
            self._runtime = None  # free the old base model before loading the next
            # Taken even if the build fails: LoRA may already be injected into it.
            preloaded, self._preloaded = self._preloaded, None
            self._runtime = build_runtime(self.cfg, plan, preloaded)
            self._key = key
        return self._runtime

    def handle(self, request: Frame, conn: socket.socket) -> None:
        """Answer one request on ``conn`` (one at a time: the model is not thread-safe)."""
        if request.kind not in (KIND_DESCRIBE, KIND_TRAIN, KIND_EVALUATE):
            raise WorkerFrameError(f"unknown request kind {request.kind[:100]!r}")
        plan = _plan(request)
        with self._lock:
            site = self.runtime(plan)
            if request.kind == KIND_DESCRIBE:
                reply = {"kind": KIND_SITE, "site_id": site.site_id}
                send_frame(conn, reply | {"fingerprint": site.fingerprint})
            elif request.kind == KIND_TRAIN:
                self._train(site, plan, request, conn)
            else:
                version = field_of(request, "version", int)
                run_id = field_of(request, "run_id", str)
                result = site.evaluate(request.states["received"], plan, version, run_id)
                send_frame(conn, {"kind": KIND_EVAL, **asdict(result)})

    def _train(
        self, site: SiteRuntime, plan: SitePlan, request: Frame, conn: socket.socket
    ) -> None:
        def on_step(step: int, steps: int, loss: float) -> None:
            send_frame(conn, {"kind": KIND_STEP, "step": step, "steps": steps, "loss": loss})

        update = site.train(
            request.states["received"],
            plan,
            field_of(request, "round", int),
            field_of(request, "version", int),
            on_step,
            field_of(request, "run_id", str),
            request.states.get("control") if plan.train.scaffold else None,
        )
        header: dict[str, Any] = {"kind": KIND_UPDATE, **asdict(update.result)}
        header |= {"examples": update.examples, "clip_scale": update.clip_scale}
        states = {"delta": update.delta}
        if update.control is not None:
            states["control"] = update.control
        send_frame(conn, header, states)


def _plan(request: Frame) -> SitePlan:
    try:
        return SitePlan.model_validate_json(field_of(request, "plan", str))
    except ValueError as exc:  # pydantic's ValidationError
        raise ConfigError(f"the {request.kind!r} request's site plan is invalid: {exc}") from None


class _Handler(socketserver.BaseRequestHandler):
    server: WorkerServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(IO_TIMEOUT)
        kind = "unread"
        try:
            request = recv_frame(conn, _REQUEST_STATES)
            kind = request.kind
            self.server.worker.handle(request, conn)
        except (ConnectionError, TimeoutError) as exc:  # the ClientApp went away or stalled
            logger.warning("site worker: %s request: connection lost: %s", kind, exc)
        except FedloraError as exc:  # a refusal: the ClientApp replies with it
            logger.warning("site worker: refused a %s request: %s", kind, exc)
            _reply_error(conn, exc)
        except Exception as exc:  # a failure of fedlora or torch: reported, the worker lives on
            logger.exception("site worker: a %s request failed", kind)
            _reply_error(conn, exc)


def _reply_error(conn: socket.socket, exc: BaseException) -> None:
    with contextlib.suppress(OSError):
        send_frame(conn, error_header(exc))


class WorkerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Accepts connections on the worker socket; a thread per connection, one request each."""

    daemon_threads = True

    def __init__(self, worker: SiteWorker, path: Path) -> None:
        super().__init__(str(path), _Handler, bind_and_activate=False)
        self.worker = worker
        self.path = path


def _private_folder(folder: Path) -> None:
    """Create ``folder`` (mode 0700) or check that an existing one is ours and private."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise SiteWorkerError(f"{folder} is not a folder owned by this user")
    os.chmod(folder, 0o700)


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a daemon that died; refuse if a worker still answers there."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise SiteWorkerError(f"{path} exists and is not a socket; remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise SiteWorkerError(
        f"another site daemon serves {path}; stop it first (one daemon per site and FLWR_HOME)"
    )


def bind_worker(worker: SiteWorker, path: Path) -> WorkerServer:
    """A listening server at ``path``: socket 0600 in a 0700 folder."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH_BYTES:
        raise SiteWorkerError(
            f"worker socket path {path} is longer than {_MAX_SOCKET_PATH_BYTES} bytes; "
            "set FLWR_HOME to a shorter folder"
        )
    _private_folder(path.parent)
    _remove_stale(path)
    server = WorkerServer(worker, path)
    old = os.umask(0o177)  # created 0600: no moment where another user could connect
    try:
        server.server_bind()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.server_activate()
    return server


@contextlib.contextmanager
def serve_worker(worker: SiteWorker, path: Path) -> Iterator[WorkerServer]:
    """Serve ``worker`` at ``path`` in a background thread; stop and remove the socket after."""
    server = bind_worker(worker, path)
    thread = threading.Thread(target=server.serve_forever, name="site-worker", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        thread.join(timeout=5)
