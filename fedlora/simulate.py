"""Run a whole federation on one machine with Flower's simulation runtime (Ray backend).

The coordinator (ServerApp) runs in this process; each virtual site's ClientApp runs in a Ray
worker with ``simulation.cpus-per-site`` cores (or, with ``simulation.backend = "in-process"``,
in this process too: ``fedlora/in_process.py``). The apps are built from the parsed config, so
nothing is packaged and no data leaves the repository.

Flower's runtime runs in a worker thread while the main thread waits for it, so that Ctrl-C
and SIGTERM reach fedlora's handlers (``fedlora/interrupt.py``) rather than Ray's, which
``ray.init`` installs when it is called from the main thread.

``flwr run .`` runs the same federation through Flower's supported entry point instead
(``common/app_run_config.py``); see ``run_in_simulation_runtime`` for why this one stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.app import SiteKeys, make_client_app, release_site_caches
from common.app_run_config import KEYS_FOLDER, SITES_FOLDER
from common.atomic import hold_writes
from common.config import RunConfig
from common.progress import print_message
from fedlora.deploy_flower import OFFLINE_ENVIRONMENT
from fedlora.interrupt import RunInterrupted, restore_handlers
from server.app import make_server_app
from server.federation import load_inputs, prepare
from server.rundir import RunDirLock, check_start
from server.simulation_keys import provision_keys as provision_simulation_keys
from server.strategy import Sealing

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

logger = logging.getLogger(__name__)

# The deployed processes' offline settings, plus: show every site's progress line (Ray would
# fold repeated log lines from different workers into one), and keep Ray's C++ failure-signal
# handler out of this process: it catches SIGTERM too and prints a stack dump before fedlora's
# handler runs (RAY_DISABLE_FAILURE_SIGNAL_HANDLER=0 brings it back for debugging a crash).
_ENVIRONMENT = {
    **OFFLINE_ENVIRONMENT,
    "RAY_DEDUP_LOGS": "0",
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
}


def set_offline_environment() -> None:
    """The offline/no-telemetry variables (those already set are kept), before a model loads."""
    for key, value in _ENVIRONMENT.items():
        os.environ.setdefault(key, value)


@contextmanager
def scratch_folders() -> Iterator[None]:
    """Private Flower and Ray folders for one run.

    They live in a scratch folder (``$TMPDIR/fedlora-XXXXXXXX``) that is removed when the run
    ends, however it ends (an error, Ctrl-C), and the variables naming them are unset again;
    ``FLWR_HOME`` or ``RAY_TMPDIR`` set by the user are used as they are.
    """
    # Ray's socket paths must stay short (AF_UNIX limit of 107 bytes), so not under out_dir.
    # A Ray worker still shutting down may hold a file open: cleanup errors leave that file.
    with tempfile.TemporaryDirectory(prefix="fedlora-", ignore_cleanup_errors=True) as scratch:
        folders = {"FLWR_HOME": Path(scratch) / "flwr", "RAY_TMPDIR": Path(scratch) / "ray"}
        added = [key for key in folders if key not in os.environ]
        for key in added:
            os.environ[key] = str(folders[key])
        Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
        try:
            yield
        finally:
            for key in added:
                os.environ.pop(key, None)


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Flower's Ray backend settings: a local Ray instance with this machine's cores, or the
    running Ray cluster that ``RAY_ADDRESS`` names (Ray's own convention; the cluster then
    says how many cores there are, and Ray refuses a core count from its client)."""
    cpus = os.cpu_count() or 1
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        init_args["num_cpus"] = cpus
    return {
        "client_resources": {
            "num_cpus": min(cfg.simulation.cpus_per_site, cpus),
            "num_gpus": cfg.simulation.gpus_per_site,
        },
        "init_args": init_args,
    }


def start_local_ray(backend: dict[str, Any]) -> None:
    """Start Ray from the main thread with SIGINT ignored, as Flower's backend would start it
    (it then finds Ray running and uses it).

    Ray's daemons (GCS, raylet) join this process group, and a terminal's Ctrl-C reaches the
    whole group: a raylet killed by it takes the sites' workers with it, and the coordinator's
    thread logs their deaths before its own handler has muted the terminal. An ignored SIGINT
    is inherited, so only this process reacts, and stops Ray itself (``stop_for_exit``). The
    handlers in place before (fedlora's, or Ray's SIGTERM one) are put back. A cluster named
    by ``RAY_ADDRESS`` is left to Flower to connect to.
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    import ray

    if ray.is_initialized():
        return
    # Flower's own start (flwr/server/superlink/fleet/vce/backend/raybackend.py): the workers
    # get this process's import path.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.init(
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            include_dashboard=False,
            **backend["init_args"],
        )
    finally:
        restore_handlers(previous)


# How long an interrupted run waits for a write in progress to finish before it exits anyway.
WRITE_GRACE_SECONDS = 10.0


class _RayNotMainThread(logging.Filter):
    """Drops Ray's warning that it sets no SIGTERM handler outside the main thread: fedlora's
    handler is the one that must run (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


_RAY_FILTER = _RayNotMainThread()  # one instance: adding it again is a no-op


def run_in_thread(work: Callable[[], object]) -> None:
    """Run ``work`` in a daemon thread; the main thread only waits, so a signal handler runs at
    once. Re-raises what ``work`` raised."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the main thread, which raises it
            errors.append(exc)

    thread = threading.Thread(target=target, name="fedlora-simulation", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if errors:
        raise errors[0]


def stop_for_exit() -> None:
    """After ``RunInterrupted``: wait for a write in progress, keep any new one from starting,
    and shut Ray's processes down, so that the run folder holds only whole files."""
    if not hold_writes(WRITE_GRACE_SECONDS):
        logger.warning("a write did not finish within %.0f s of the interrupt", WRITE_GRACE_SECONDS)
    ray = sys.modules.get("ray")  # None when the signal came before Flower imported it
    # A Ctrl-C reaches the whole process group: Ray's own processes got it too and may be gone
    # already, so ray.shutdown can fail. No cleanup error may replace the interrupt (the
    # terminal is muted by now: it would end the run with rc 1 and no line).
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # stops the Ray processes this run started, sites included
    except Exception as exc:
        logger.warning("ray.shutdown after the interrupt failed (%s); stopping what is left", exc)
    try:
        stop_leftovers(LEFTOVER_GRACE_SECONDS)
    except Exception as exc:
        logger.warning("stopping the run's leftover processes failed: %s", exc)


# Seconds Ray's own processes get to exit after ray.shutdown before they are killed.
LEFTOVER_GRACE_SECONDS = 3.0


def _ours() -> set[int]:
    """Processes this run left: descendants of this process, and the other members of its
    process group or session where this process leads it (never a shell's session)."""
    me, parents, groups = os.getpid(), {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        groups[pid] = (int(fields[2]), int(fields[3]))  # process group, session
    found: set[int] = set()
    frontier = [me]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    leads_group, leads_session = os.getpgrp() == me, os.getsid(0) == me
    for pid, (group, session) in groups.items():
        if (leads_group and group == me) or (leads_session and session == me):
            found.add(pid)
    found.discard(me)
    return found


def stop_leftovers(grace: float) -> None:
    """SIGTERM what this run left (Ray workers that outlived ray.shutdown), SIGKILL after
    ``grace`` seconds: an interrupted run's children do not outlive it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        left = _ours()
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = _ours()
        if not left:
            return


def provision_keys(cfg: RunConfig, out_dir: Path) -> tuple[Sealing | None, SiteKeys | None]:
    """Keys in simulation (``server.simulation_keys``): the coordinator's, and the virtual
    sites' folder (None in privacy mode ``none``)."""
    sealing = provision_simulation_keys(cfg, out_dir)
    return sealing, None if sealing is None else SiteKeys(out_dir / KEYS_FOLDER)


def run_in_simulation_runtime(server_app: ServerApp, client_app: ClientApp, cfg: RunConfig) -> None:
    """Run ``server_app`` with ``cfg.federation.sites`` virtual sites on ``simulation.backend``:
    Flower's Ray runtime, or this process (``fedlora/in_process.py``).

    The one call of ``flwr.simulation.run_simulation``, which Flower 1.42 marks deprecated in
    favour of ``flwr run``. Flower 1.42 has no supported in-process entry point: ``flwr run``
    packages the app and hands it to a local SuperLink that outlives the command, so apps built
    from the parsed config (``--set``, ``--resume``, comparison arms) and Ctrl-C handled here
    (``fedlora/interrupt.py``) need this one.
    """
    if cfg.simulation.backend == "in-process":
        from fedlora.in_process import run_in_process

        try:
            run_in_process(server_app, client_app, cfg.federation.sites)
        finally:
            release_site_caches()
        return
    from flwr.simulation import run_simulation  # after the environment is set

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.federation.sites,
        backend_config=backend_config(cfg),
    )


def simulate(cfg: RunConfig, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Prepare the coordinator, run (or resume) all rounds, return ``summary.json``.

    Every check that can fail (the run folder's state, the data, the model) runs before
    anything is written, so that a failed start leaves the run folder as it was.
    """
    check_start(out_dir, resume)
    set_offline_environment()
    print_message(
        f"[bold]fedlora simulate[/]: {cfg.federation.sites} sites, "
        f"{cfg.federation.rounds} rounds, model {cfg.model.name}, output {out_dir}"
    )
    inputs = load_inputs(cfg)
    with scratch_folders(), RunDirLock(out_dir):
        try:
            sealing, site_keys = provision_keys(cfg, out_dir)
            coord = prepare(cfg, out_dir, sealing, inputs=inputs)
            logging.getLogger("ray._private.worker").addFilter(_RAY_FILTER)
            server_app = make_server_app(coord, resume=resume)
            client_app = make_client_app(cfg, site_keys, out_dir / SITES_FOLDER)
            if cfg.simulation.backend == "ray":
                start_local_ray(backend_config(cfg))
            run_in_thread(lambda: run_in_simulation_runtime(server_app, client_app, cfg))
        except RunInterrupted:
            stop_for_exit()  # then the folders above are removed and the lock released
            raise
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the federation ended without writing {summary_path}; see the log")
    summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    return summary
