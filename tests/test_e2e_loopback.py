"""Deployment end to end on 127.0.0.1: provision, coordinator + 3 site daemons, a sealed run.

Every process is a real `fedlora` command (the ones the containers and the systemd unit run):
`keys init`, `coordinator start` (SuperLink with TLS + SuperNode auth on an internal port,
nginx on the public one), three `site start` (SuperNode + the fedlora ClientApp, connecting
through the proxy), `coordinator run` (from this host, to the internal port). An outsider who
holds the public CA certificate tries, through the public address, what the Control and
Runtime APIs allow. Each process runs in its own process group and is stopped by PID at the
end, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.registry import Registry
from fedlora.deploy_keys import make_node_key
from tests.helpers.deployment import (
    BIN,
    REPO,
    Deployment,
    free_port,
    site_toml,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SITES = ("a", "b", "c")
RUN_TIMEOUT = 900.0  # seconds for 2 rounds (each message starts a ClientApp process: ~5-15 s)


def require_nginx() -> None:
    """Skip without nginx, unless FEDLORA_REQUIRE_NGINX=1 (CI installs it: .ci/run)."""
    if shutil.which("nginx") is None:
        message = "nginx is not installed (Debian: apt-get install nginx)"
        if os.environ.get("FEDLORA_REQUIRE_NGINX") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _write_files(root: Path, port: int, public_port: int) -> None:
    lines = (REPO / "examples/data/dolly-tiny.jsonl").read_text().splitlines()
    for index, site in enumerate(SITES):  # each site its own file: no partitioning at a site
        (root / f"{site}.jsonl").write_text("\n".join(lines[index :: len(SITES)]) + "\n")
        groups = ["ab"] if site in ("a", "b") else []  # as the run's [groups] has them
        (root / f"site-{site}.toml").write_text(
            site_toml(site, index, free_port(), public_port, groups=groups)
        )
    (root / "coordinator.toml").write_text(
        f'[coordinator]\nkeys = "keys/coordinator"\nstate = "state"\nruns = "runs"\n'
        f'host = "127.0.0.1"\nport = {port}\n\n[proxy]\nhost = "127.0.0.1"\nport = {public_port}\n'
    )
    run = (REPO / "examples/tiny.toml").read_text()
    # A deployed coordinator reads no training data: each site names its own in site.toml.
    run = run.replace('path = "data/dolly-tiny.jsonl"\n', "")
    assert "dolly-tiny" not in run
    # Three modules: shared, one for group "ab" (sites a and b), one each site keeps.
    run += (
        '\n[modules.ab]\nscope = "group:ab"\nrank = 2\nalpha = 4\ntargets = ["q_proj"]\n'
        '\n[modules.style]\nscope = "private"\nrank = 2\nalpha = 4\ntargets = ["v_proj"]\n'
        '\n[groups]\nab = ["a", "b"]\n'
    )
    (root / "run.toml").write_text(run.replace("rounds = 3", "rounds = 2"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    require_nginx()
    root = tmp_path_factory.mktemp("loopback")
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(root / "flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    dep = Deployment(root, free_port(), env, public_port=free_port())
    _write_files(root, dep.port, dep.site_port)
    done = dep.fedlora("keys", "init", "--out", "keys", "--sites", ",".join(SITES))
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        log = dep.start(
            "coordinator",
            str(BIN / "fedlora"),
            "coordinator",
            "start",
            "--config",
            "coordinator.toml",
        )
        wait_for(
            lambda: all(f"site {s} " in log.read_text() for s in SITES), 120, "site registration"
        )
        for site in SITES:
            site_env = dict(env, FLWR_HOME=str(root / f"flwr-{site}"))
            dep.start(
                f"site-{site}",
                str(BIN / "fedlora"),
                "site",
                "start",
                "--config",
                f"site-{site}.toml",
                env=site_env,
            )
        yield dep
    finally:
        dep.stop()


def test_sealed_run_over_tls_with_site_auth(deployment: Deployment) -> None:
    started = time.monotonic()
    done = deployment.fedlora(
        "coordinator", "run", "run.toml", "--config", "coordinator.toml", "--name", "tiny"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = deployment.root / "runs" / "tiny"
    for proc in deployment.procs:
        assert proc.poll() is None, f"{proc.args!r} exited early"
    wait_for(lambda: (out / "summary.json").is_file(), RUN_TIMEOUT, "the run's summary.json")
    print(f"2 rounds, 3 sites on loopback: {time.monotonic() - started:.1f} s")

    versions = Registry(out / "registry").versions("shared")
    assert [v.version for v in versions] == [0, 1, 2]
    assert all(v.manifest["privacy"] == "sealed" for v in versions)
    assert sorted(versions[-1].manifest["cohort"]) == list(SITES)  # every site, by its own id
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
    assert "a round 1 step" in (deployment.root / "site-a.log").read_text()  # logs each round
    registry = Registry(out / "registry")
    summary = json.loads((out / "summary.json").read_text())
    assert registry.modules() == ["ab", "shared"]  # the private module never reached it
    assert registry.get("ab", 2).manifest["cohort"] == ["a", "b"]
    for site in SITES:  # each site's own store: what it received, its private module
        state = deployment.root / "keys" / "sites" / f"{site}-state"
        store = Registry(state / summary["run_id"] / "registry")
        expected = ["ab", "shared", "style"] if site in ("a", "b") else ["shared", "style"]
        assert store.modules() == expected, site
        assert [v.version for v in store.versions("style")] == [0, 1, 2]
        assert store.verify() == []


def _supernode(dep: Deployment, name: str, *args: str) -> tuple[int, str]:
    """Run a bounded SuperNode against the coordinator; its exit code and output."""
    log = dep.root / f"{name}.log"
    env = dict(dep.env, FLWR_HOME=str(dep.root / f"flwr-{name}"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{dep.site_port}",
                "--port",
                str(free_port()),
                "--max-retries",
                "1",
                "--max-wait-time",
                "10",
                *args,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, log.read_text()


def test_unregistered_supernode_key_is_refused(deployment: Deployment) -> None:
    stranger = deployment.root / "stranger"
    make_node_key(stranger)
    code, output = _supernode(
        deployment,
        "stranger",
        "--root-certificates",
        str(deployment.root / "keys/sites/a/ca.crt"),
        "--auth-supernode-private-key",
        str(stranger / "supernode.key"),
    )
    assert code != 0
    assert "Failed to activate SuperNode" in output


def test_plaintext_client_is_refused(deployment: Deployment) -> None:
    code, output = _supernode(deployment, "plaintext", "--insecure")
    assert code != 0
    assert "could not establish a connection" in output


def test_site_with_another_base_model_refuses_to_start(deployment: Deployment) -> None:
    other = deployment.root / "site-other.toml"
    other.write_text(site_toml("a", 0, free_port(), deployment.site_port, model_seed=1))
    coordinator = deployment.fedlora("fingerprint", "tiny-llama").stdout.split()[-1]
    done = deployment.fedlora(
        "site", "start", "--config", str(other), "--expect-fingerprint", coordinator
    )
    assert done.returncode == 2, done.stdout + done.stderr
    message = " ".join(done.stdout.split())
    assert "fingerprint mismatch" in message
    named = set(re.findall(r"\b[0-9a-f]{64}\b", message))
    assert coordinator in named and len(named) == 2  # the expected and the local digest


# ---------------------------------------------------------------------------- outsiders

EVIL_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evilapp"
version = "1.0.0"
description = "an outsider's Flower app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "evil.server:app"
clientapp = "evil.client:app"

[tool.flwr.app.config]
marker = ""
"""
EVIL_SERVER = """\
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    Path(str(context.run_config["marker"])).write_text("outsider code ran at the coordinator")
"""
EVIL_CLIENT = "from flwr.clientapp import ClientApp\n\napp = ClientApp()\n"


def _outsider_env(dep: Deployment) -> dict[str, str]:
    """An outsider's ``flwr`` CLI: only the public CA certificate and the public address."""
    home = dep.root / "outsider"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "public"\n\n[superlink.public]\n'
        f'address = "localhost:{dep.site_port}"\n'
        f'root-certificates = "{dep.root / "keys/sites/a/ca.crt"}"\n'
    )
    return dict(dep.env, FLWR_HOME=str(home))


def _flwr_json(dep: Deployment, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        cwd=dep.root,
        env=_outsider_env(dep),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout
    return dict(json.loads(out[out.index("{") :]))


def test_outsider_cannot_register_a_supernode_through_the_public_address(
    deployment: Deployment,
) -> None:
    outsider = deployment.root / "outsider-node"
    make_node_key(outsider)
    answer = _flwr_json(deployment, "supernode", "register", str(outsider / "supernode.pub"))
    assert answer["success"] is False, answer
    assert "403 Forbidden" in str(answer["error-message"])
    # And the key was not registered: a SuperNode holding it is not let in.
    code, output = _supernode(
        deployment,
        "outsider-node",
        "--root-certificates",
        str(deployment.root / "keys/sites/a/ca.crt"),
        "--auth-supernode-private-key",
        str(outsider / "supernode.key"),
    )
    assert code != 0
    assert "Failed to activate SuperNode" in output


def test_outsider_run_is_refused_and_runs_no_code(deployment: Deployment) -> None:
    app = deployment.root / "evilapp"
    (app / "evil").mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(EVIL_PYPROJECT)
    (app / "evil/__init__.py").write_text("")
    (app / "evil/server.py").write_text(EVIL_SERVER)
    (app / "evil/client.py").write_text(EVIL_CLIENT)
    marker = deployment.root / "outsider-was-here"
    answer = _flwr_json(deployment, "run", str(app), "--run-config", f'marker="{marker}"')
    assert answer["success"] is False, answer
    assert "403 Forbidden" in str(answer["error-message"])
    listing = _flwr_json(deployment, "list")  # nor may it see the runs
    assert listing["success"] is False and "403 Forbidden" in str(listing["error-message"])
    time.sleep(5)  # had the run been accepted, its ServerApp would start within seconds
    assert not marker.exists()


OPERATOR_SERVER = """\
import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 180  # the sites may still be connecting
    while len(grid.get_node_ids()) < int(context.run_config["sites"]):
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    nodes = sorted(grid.get_node_ids())
    asks = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in nodes]
    replies = grid.send_and_receive(asks, timeout=180)
    answers = [r.error.reason if r.has_error() else "content" for r in replies]
    result = {"nodes": len(nodes), "answers": answers}
    Path(str(context.run_config["result"])).write_text(json.dumps(result))
"""


def test_a_run_whose_app_is_not_the_sites_install_runs_no_code_at_the_sites(
    deployment: Deployment,
) -> None:
    """Even the coordinator's operator cannot make a site run other code than it installed."""
    app = deployment.root / "operator-app"
    (app / "op").mkdir(parents=True, exist_ok=True)
    marker = deployment.root / "operator-code-ran-at-a-site"
    result = deployment.root / "operator-app-replies.json"
    (app / "pyproject.toml").write_text(
        EVIL_PYPROJECT.replace("evil.", "op.").replace('marker = ""', 'result = ""\nsites = 0')
    )
    (app / "op/__init__.py").write_text("")
    (app / "op/server.py").write_text(OPERATOR_SERVER)
    client = f"from pathlib import Path\n\nPath({str(marker)!r}).write_text('ran')\n"
    (app / "op/client.py").write_text(client + EVIL_CLIENT)
    operator = dict(deployment.env, FLWR_HOME=str(deployment.root / "state/flwr"))
    config = f'result="{result}" sites={len(SITES)}'
    done = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "fedlora", "--run-config", config],
        cwd=deployment.root,
        env=operator,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # the SuperLink takes the run
    wait_for(result.is_file, 300, "the operator app's replies")
    replies = json.loads(result.read_text())
    assert replies["nodes"] == len(SITES)
    assert len(replies["answers"]) == len(SITES)
    for answer in replies["answers"]:  # every site refused, saying why
        assert "not the fedlora installed at this site" in answer, answer
    assert not marker.exists()
    for proc in deployment.procs:  # and the sites are still up for the next run
        assert proc.poll() is None, f"{proc.args!r} exited"


def _flower_paths() -> list[str]:
    """Every Control and Runtime API path of the installed Flower (its own route tables)."""
    from flwr.supercore.routers.runtime.responses import router as responses
    from flwr.supercore.routers.runtime.router import router as runtime
    from flwr.superlink.routers.control.router import router as control

    paths = [
        getattr(route, "path", "") for r in (control, runtime, responses) for route in r.routes
    ]
    assert len(paths) > 40 and all(p.startswith(("/v1/control/", "/v1/runtime/")) for p in paths)
    return paths


def test_public_address_serves_the_fleet_api_and_health_only(deployment: Deployment) -> None:
    """Raw HTTPS, as any client would send it: every Control and Runtime path is refused by
    the proxy, also spelled to slip past a prefix match; Fleet and health reach the SuperLink."""
    tls = ssl.create_default_context(cafile=str(deployment.root / "keys/sites/a/ca.crt"))
    with httpx.Client(base_url=f"https://localhost:{deployment.site_port}", verify=tls) as web:
        for path in _flower_paths():
            assert web.post(path, content=b"").status_code == 403, path
        for path in ("/docs", "/openapi.json", "/", "/v1/", "/v2/fleet/get-run"):
            assert web.get(path).status_code == 404, path
        for sneaky in (
            "/v1/fleet/../control/list-runs",
            "/v1/fleet/%2e%2e/control/list-runs",
            "/v1/fleet/..%2fcontrol%2flist-runs",
            "/v1//control/list-runs",
            "/v1/fleet/get-run?redirect=/v1/control/list-runs",
        ):
            url = httpx.URL(f"https://localhost:{deployment.site_port}")
            request = web.build_request("POST", url.copy_with(raw_path=sneaky.encode()))
            assert web.send(request).status_code in (403, 404), sneaky
        assert web.get("/health").status_code == 200
        assert web.get("/v1/fleet/get-run").status_code == 403  # Fleet calls are POSTs
        # A Fleet call reaches the SuperLink, which answers it (here: not protobuf).
        fleet = web.post("/v1/fleet/get-run", content=b"")
        assert fleet.status_code not in (403, 404) and "nginx" not in fleet.text


def _listening(port: int) -> set[str]:
    """The local addresses of TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_superlink_listens_on_loopback_only(deployment: Deployment) -> None:
    assert _listening(deployment.port) == {"0100007F"}  # 127.0.0.1, little-endian hex
    assert _listening(deployment.site_port) == {"0100007F"}  # the proxy (here on loopback)
