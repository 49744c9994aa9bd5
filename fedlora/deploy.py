"""``fedlora coordinator``: the coordinator service (SuperLink + the fedlora ServerApp).

fedlora coordinator start --config coordinator.toml
fedlora coordinator run RUN.toml --config coordinator.toml [--name NAME] [--stream]
fedlora coordinator register --config coordinator.toml
fedlora coordinator proxy-config --config coordinator.toml [--certs DIR] [--runtime DIR]

``start`` runs the SuperLink in the foreground with TLS and SuperNode authentication on an
internal address (its port also serves the Control API), its database under
``coordinator.state``, and with ``[proxy] start = true`` the nginx proxy that alone faces the
network (Fleet API and health only); it registers every enrolled site's SuperNode key and, if
the last submitted run did not finish (the coordinator was stopped or killed), submits it
again: the ServerApp resumes it from its last completed round. ``run`` submits a federation
run from this host. ``proxy-config`` prints the proxy's nginx.conf, for a proxy run elsewhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from rich.markup import escape

from common.atomic import write_json_atomic
from common.config import load_config
from common.errors import FedloraError
from common.progress import console, print_message
from common.site_config import CoordinatorConfig, load_coordinator_config
from fedlora.app_pin import APP_PACKAGES
from fedlora.deploy_flower import (
    CONNECTION,
    DeployError,
    executable,
    flower_env,
    run_flwr,
    wait_for_port,
    write_connection,
)
from fedlora.deploy_keys import CA_CERT, SUPERNODES_DIR, TLS_CERT, TLS_KEY
from fedlora.deploy_proxy import (
    ProxyPaths,
    check_proxy_config,
    host_paths,
    proxy_command,
    proxy_probe_address,
    render_nginx_config,
    write_proxy_config,
)
from fedlora.help_text import plain

SOURCE_DIR = Path(__file__).resolve().parent.parent  # pyproject.toml [tool.flwr.app] + packages
ACTIVE_RUN = "active-run.json"  # under coordinator.state: the last run submitted
SUMMARY = "summary.json"  # written by the ServerApp when a run has finished
READY_TIMEOUT = 60.0  # seconds for the SuperLink to accept connections


def _flwr_home(cfg: CoordinatorConfig) -> Path:
    return cfg.coordinator.state / "flwr"


def coordinator_env(cfg: CoordinatorConfig) -> dict[str, str]:
    """Flower's environment for the coordinator; writes the CLI's TLS connection."""
    home = _flwr_home(cfg)
    write_connection(home, cfg.coordinator.control, cfg.coordinator.keys / CA_CERT)
    return flower_env(home)


def superlink_command(cfg: CoordinatorConfig) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode auth, a database and no dependency installs."""
    c = cfg.coordinator
    for name in (TLS_CERT, TLS_KEY, CA_CERT):
        if not (c.keys / name).is_file():
            raise DeployError(
                f"coordinator.keys: {c.keys / name} not found; create it with `fedlora keys init`"
            )
    command = [
        executable("flower-superlink"),
        "--ssl-certfile",
        str(c.keys / TLS_CERT),
        "--ssl-keyfile",
        str(c.keys / TLS_KEY),
        "--ssl-ca-certfile",
        str(c.keys / CA_CERT),
        "--enable-supernode-auth",
        "--database",
        str(c.state / "superlink.db"),
        "--host",
        c.host,
        "--port",
        str(c.port),
        "--disable-runtime-dependency-installation",
    ]
    if c.health_port is not None:  # plain gRPC, only as reachable as the SuperLink itself
        command += ["--health-server-address", f"{c.host}:{c.health_port}"]
    return command


def _register(public: Path, env: dict[str, str]) -> tuple[str, dict[str, Any]]:
    out = run_flwr(["supernode", "register", str(public), CONNECTION, "--format", "json"], env)
    return public.stem, json.loads(out[out.index("{") :])


def register_sites(cfg: CoordinatorConfig, env: dict[str, str]) -> list[str]:
    """Register every ``<keys>/supernodes/<site>.pub`` with the SuperLink; return new ones.

    Registering a key twice is harmless (the SuperLink answers "already in use"). The
    ``flwr`` CLI takes about 2 s to start, so the sites are registered in parallel.
    """
    keys = sorted((cfg.coordinator.keys / SUPERNODES_DIR).glob("*.pub"))
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda public: _register(public, env), keys))
    registered = []
    for site, answer in answers:
        if answer.get("success"):
            registered.append(site)
            print_message(f"registered site {site} (node {answer.get('node-id')})")
        elif "already in use" in str(answer.get("error-message", "")):
            print_message(f"site {site} is registered")
        else:
            raise DeployError(f"registering site {site}: {answer.get('error-message')}")
    return registered


def stage_app(dest: Path, source: Path = SOURCE_DIR) -> Path:
    """Copy the Flower app (pyproject.toml + the Python packages) to ``dest/fedlora``.

    ``flwr run`` walks every file under the app folder before filtering; the repository holds
    a multi-GB virtual environment and run outputs, so the coordinator packages a staged copy
    of exactly what goes into the FAB (about 0.1 s instead of 15 s).
    """
    if not (source / "pyproject.toml").is_file():
        raise DeployError(f"{source} has no pyproject.toml: fedlora must be installed from source")
    app = dest / "fedlora"
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(parents=True)
    shutil.copy2(source / "pyproject.toml", app / "pyproject.toml")
    for package in APP_PACKAGES:
        for path in sorted((source / package).rglob("*.py")):
            target = app / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return app


def _run_config_arg(config: Path, out: Path, keys: Path) -> str:
    values = {"config": str(config), "out": str(out), "keys": str(keys)}
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def submit_run(
    cfg: CoordinatorConfig, run_config: Path, name: str | None = None, stream: bool = False
) -> Path:
    """Submit the federation ``run_config`` to the SuperLink; return its run directory."""
    run_config = run_config.resolve()
    load_config(run_config)  # a config error now, not inside the ServerApp
    out = (cfg.coordinator.runs / (name or run_config.stem)).resolve()
    env = coordinator_env(cfg)
    write_json_atomic(
        cfg.coordinator.state / ACTIVE_RUN, {"config": str(run_config), "out": str(out)}
    )
    app = stage_app(cfg.coordinator.state / "app")
    args = ["run", str(app), CONNECTION, "--run-config"]
    args.append(_run_config_arg(run_config, out, cfg.coordinator.keys))
    if stream:
        args.append("--stream")
    print_message(f"submitting {run_config} → {out}")
    if stream:  # the logs go to the terminal, bounded by the run itself
        code = subprocess.call([executable("flwr"), *args], env=env)
        if code != 0:
            raise DeployError(f"`flwr run` exited with code {code}")
    else:
        print_message(run_flwr(args, env).strip())
    return out


def unfinished_run(cfg: CoordinatorConfig) -> tuple[Path, Path] | None:
    """The last submitted run (config, run directory) if it has not finished."""
    record = cfg.coordinator.state / ACTIVE_RUN
    if not record.is_file():
        return None
    active = json.loads(record.read_text(encoding="utf-8"))
    out = Path(active["out"])
    return None if (out / SUMMARY).is_file() else (Path(active["config"]), out)


def _start_proxy(cfg: CoordinatorConfig) -> subprocess.Popen[bytes] | None:
    """nginx on the public address when ``[proxy] start = true``; None otherwise."""
    if cfg.proxy is None or not cfg.proxy.start:
        return None
    config = write_proxy_config(cfg)
    check_proxy_config(cfg, config)
    print_message(
        f"starting the proxy on {cfg.proxy.host}:{cfg.proxy.port} (Fleet API and health only) "
        f"→ {cfg.upstream}"
    )
    proc = subprocess.Popen(proxy_command(cfg, config))
    try:
        wait_for_port(proxy_probe_address(cfg.proxy), READY_TIMEOUT, proc)
    except BaseException:
        _stop([proc])
        raise
    return proc


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


def start_coordinator(cfg: CoordinatorConfig) -> int:
    """Run the SuperLink (and the proxy) in the foreground; register sites; resume a run."""
    cfg.coordinator.state.mkdir(parents=True, exist_ok=True)
    cfg.coordinator.runs.mkdir(parents=True, exist_ok=True)
    env = coordinator_env(cfg)
    command = superlink_command(cfg)
    print_message(f"starting the SuperLink on {cfg.coordinator.host}:{cfg.coordinator.port}")
    proc = subprocess.Popen(command, env=env)
    procs = [proc]

    def stop(signum: int, frame: FrameType | None) -> None:
        for child in procs:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        wait_for_port(cfg.coordinator.control, READY_TIMEOUT, proc)
        proxy = _start_proxy(cfg)
        if proxy is not None:
            procs.append(proxy)
        register_sites(cfg, env)
        pending = unfinished_run(cfg)
        if pending is not None:
            config, out = pending
            print_message(f"resubmitting the unfinished run in {out}")
            submit_run(cfg, config, out.name)
    except BaseException:
        _stop(procs)
        raise
    code = proc.wait()
    _stop(procs)  # the proxy has nothing to forward to once the SuperLink is gone
    return code


def print_proxy_config(cfg: CoordinatorConfig, certs: Path | None, runtime: Path | None) -> None:
    """Print the proxy's nginx.conf; ``certs``/``runtime``: its paths where it runs."""
    default = host_paths(cfg)
    paths = ProxyPaths(certs or default.certs, runtime or default.runtime)
    print(render_nginx_config(cfg, paths), end="")


# ---------------------------------------------------------------------------- command line

COORDINATOR_EPILOG = """\
examples:
  fedlora coordinator start --config examples/coordinator.toml
  fedlora coordinator run examples/tiny.toml --config examples/coordinator.toml --name tiny
  fedlora coordinator register --config examples/coordinator.toml   # after `keys add-site`
  fedlora coordinator proxy-config --config examples/coordinator.toml > nginx.conf
"""


def add_coordinator_parser(subparsers: Any) -> None:
    """Add ``coordinator start|run|register`` to the ``fedlora`` sub-parsers."""
    parser = subparsers.add_parser(
        "coordinator",
        help="the coordinator service: SuperLink with TLS + site auth, submit federation runs",
        description=plain(__doc__.split("\n\n")[2]) if __doc__ else None,
        epilog=COORDINATOR_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="coordinator_command", required=True, metavar="COMMAND")
    start = sub.add_parser(
        "start",
        help="run the SuperLink and its proxy (foreground); resume a killed run",
        description="Run the SuperLink in the foreground with TLS and SuperNode authentication "
        "on its internal address, and nginx on the public one when [proxy] start = true; "
        "register every enrolled site's SuperNode key and resubmit the last run if it did not "
        "finish (the ServerApp resumes it from its last completed round).",
    )
    start.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    run = sub.add_parser(
        "run",
        help="submit a federation run (the ServerApp) to the SuperLink",
        description="Check RUN.toml, then submit it to the running SuperLink as a Flower run; "
        "its output goes to a run folder under the coordinator's runs folder.",
    )
    run.add_argument("run_config", type=Path, metavar="RUN.toml", help="fedlora run config")
    run.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    run.add_argument("--name", help="run directory name under coordinator.runs (default: stem)")
    run.add_argument("--stream", action="store_true", help="follow the run's log until it ends")
    register = sub.add_parser(
        "register",
        help="register enrolled sites' SuperNode keys",
        description="Register with the running SuperLink the SuperNode key of every site "
        "enrolled since it started (after `fedlora keys add-site`).",
    )
    register.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    proxy = sub.add_parser(
        "proxy-config",
        help="print the proxy's nginx.conf (Fleet API and health only)",
        description="Print the nginx.conf of the reverse proxy that alone faces the network: "
        "TLS with the coordinator's certificate, POST /v1/fleet/<endpoint> and GET /health "
        "forwarded to the SuperLink, Control and Runtime API paths refused. For a proxy that "
        "runs elsewhere (docker-compose.yml); `start` writes and runs it itself.",
    )
    proxy.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    proxy.add_argument(
        "--certs", type=Path, help="folder with superlink.crt/.key and ca.crt where nginx runs"
    )
    proxy.add_argument("--runtime", type=Path, help="writable folder for nginx's pid and temp")


def run_coordinator(args: argparse.Namespace) -> int:
    """Run a parsed ``fedlora coordinator ...`` command."""
    try:
        cfg = load_coordinator_config(args.config)
        if args.coordinator_command == "start":
            return start_coordinator(cfg)
        if args.coordinator_command == "run":
            submit_run(cfg, args.run_config, args.name, args.stream)
        elif args.coordinator_command == "proxy-config":
            print_proxy_config(cfg, args.certs, args.runtime)
        else:
            register_sites(cfg, coordinator_env(cfg))
    except FedloraError as exc:
        console.print(f"[red]error[/]: {escape(str(exc))}", soft_wrap=True)
        return 2
    return 0
