"""The coordinator's proxy config: the SuperLink stays internal, nginx forwards Fleet and health.

The requests themselves (an outsider's `flwr supernode register` and `flwr run`, every Control
and Runtime path) are tried through a running proxy in tests/test_e2e_loopback.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.site_config import CoordinatorConfig, is_loopback, load_coordinator_config
from fedlora.deploy import superlink_command
from fedlora.deploy_keys import init_deployment
from fedlora.deploy_proxy import (
    FLEET_REQUEST_URI,
    ProxyPaths,
    check_proxy_config,
    proxy_command,
    render_nginx_config,
    upstream_tls_name,
    write_proxy_config,
)
from tests.helpers.subprocesses import fedlora

BASE = '[coordinator]\nkeys = "keys/coordinator"\nstate = "state"\nruns = "runs"\n'


def _config(tmp_path: Path, text: str) -> CoordinatorConfig:
    path = tmp_path / "coordinator.toml"
    path.write_text(BASE + text)
    return load_coordinator_config(path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("proxy")
    init_deployment(root / "keys", ["a"], ["coord.example.org"])
    return root


def test_the_superlink_listens_on_loopback_by_default(keys: Path) -> None:
    cfg = _config(keys, "health-port = 19098\n")
    assert cfg.coordinator.host == "127.0.0.1" and cfg.proxy is None
    command = superlink_command(cfg)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--health-server-address") + 1] == "127.0.0.1:19098"


@pytest.mark.parametrize("proxy", ["", "\n[proxy]\nport = 9092\n"])
def test_a_public_superlink_address_is_refused(tmp_path: Path, proxy: str) -> None:
    with pytest.raises(ConfigError, match=r"coordinator\.host = '0\.0\.0\.0'.*Control API"):
        _config(tmp_path, f'host = "0.0.0.0"\n{proxy}')


def test_compose_layout_an_internal_network_with_the_proxy_elsewhere(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        'host = "0.0.0.0"\nport = 9093\n\n[proxy]\nstart = false\nupstream = "coordinator:9093"\n',
    )
    assert cfg.upstream == "coordinator:9093"
    assert upstream_tls_name(cfg.upstream) == "coordinator"


def test_proxy_and_superlink_need_a_port_each(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"proxy\.port = 9093"):
        _config(tmp_path, "port = 9093\n\n[proxy]\nport = 9093\n")


def test_loopback_names() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "coordinator", ""]))
    assert upstream_tls_name("127.0.0.1:9093") == "localhost"  # nginx checks DNS names only
    assert upstream_tls_name("[::1]:9093") == "localhost"


def test_the_config_forwards_fleet_and_health_and_refuses_the_rest(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 'port = 19093\n\n[proxy]\nhost = "0.0.0.0"\nport = 19092\n')
    text = render_nginx_config(cfg, ProxyPaths(Path("/certs"), Path("/run/proxy")))
    assert "listen 0.0.0.0:19092 ssl;" in text
    assert "server 127.0.0.1:19093;" in text
    assert "ssl_certificate /certs/superlink.crt;" in text
    assert "ssl_certificate_key /certs/superlink.key;" in text
    # The hop to the SuperLink is TLS too, verified against the project CA.
    assert text.count("proxy_ssl_verify on;") == 2
    assert "proxy_ssl_trusted_certificate /certs/ca.crt;" in text
    locations = re.findall(r"location ([^{]+?) \{", text)
    assert locations == ["/v1/fleet/", "= /health", "/v1/control/", "/v1/runtime/", "/"]
    assert text.count("proxy_pass") == 2  # Fleet and health only
    assert "location /v1/control/ { return 403; }" in text
    assert "location /v1/runtime/ { return 403; }" in text
    assert re.search(r"location / \{\s+return 404;", text)
    assert "daemon" not in text  # the command line sets it (the nginx image's default does)


def test_the_mlflow_ui_gets_a_loopback_listener_of_its_own(tmp_path: Path) -> None:
    plain = _config(tmp_path, "port = 19093\n\n[proxy]\nport = 19092\n")
    paths = ProxyPaths(Path("/certs"), Path("/run/proxy"))
    assert "mlflow" not in render_nginx_config(plain, paths)  # forwarded only when configured
    cfg = _config(
        tmp_path, 'port = 19093\n\n[proxy]\nport = 19092\nmlflow-upstream = "127.0.0.1:5000"\n'
    )
    text = render_nginx_config(cfg, paths)
    assert text.startswith(render_nginx_config(plain, paths).rstrip().removesuffix("}"))
    mlflow = text.split("upstream mlflow {", 1)[1]
    assert "server 127.0.0.1:5000;" in mlflow
    assert "listen 127.0.0.1:5443 ssl;" in mlflow  # the coordinator host only
    assert "ssl_certificate /certs/superlink.crt;" in mlflow
    assert mlflow.count("proxy_pass") == 1 and "proxy_pass http://mlflow;" in mlflow
    assert re.findall(r"location ([^{]+?) \{", text)[-1] == "/"  # the Fleet rules unchanged


@pytest.mark.parametrize(
    ("proxy", "error"),
    [
        ('mlflow-host = "0.0.0.0"', r"proxy\.mlflow-host = '0\.0\.0\.0'.*authenticates nobody"),
        ("port = 5443", r"proxy\.mlflow-port = 5443 is also proxy\.port"),
    ],
)
def test_a_public_or_shared_mlflow_listener_is_refused(
    tmp_path: Path, proxy: str, error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        _config(tmp_path, f'[proxy]\nmlflow-upstream = "127.0.0.1:5000"\n{proxy}\n')


def test_the_fleet_guard_matches_endpoint_names_only() -> None:
    assert re.match(FLEET_REQUEST_URI, "/v1/fleet/pull-messages")
    for raw in (
        "/v1/fleet/../control/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/x/..%2fcontrol",
        "/v1/fleet/get-run?next=/v1/control/start-run",
        "/v1/fleet/",
        "/v1/fleet/Get-Run",
    ):
        assert not re.match(FLEET_REQUEST_URI, raw), raw


def test_proxy_config_command_prints_it_for_another_machine(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        BASE + 'host = "0.0.0.0"\n\n[proxy]\nstart = false\nupstream = "coordinator:9093"\n'
    )
    done = fedlora(
        "coordinator", "proxy-config", "--config", str(path), "--certs", "/etc/nginx/certs"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "server coordinator:9093;" in done.stdout
    assert "ssl_certificate /etc/nginx/certs/superlink.crt;" in done.stdout
    assert "proxy_ssl_name coordinator;" in done.stdout


def test_nginx_accepts_the_written_config(keys: Path) -> None:
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    path = keys / "coordinator.toml"
    path.write_text(
        BASE + 'port = 19093\n\n[proxy]\nhost = "127.0.0.1"\nport = 19092\n'
        'mlflow-upstream = "127.0.0.1:5000"\n'  # its listener is checked too
    )
    cfg = load_coordinator_config(path)
    config = write_proxy_config(cfg)
    assert config == keys / "state/proxy/nginx.conf"
    check_proxy_config(cfg, config)  # nginx -t: syntax, certificate and key load
    command = proxy_command(cfg, config)
    assert command[-2:] == ["-g", "daemon off;"]
    broken = config.read_text().replace("proxy_ssl_verify on;", "proxy_ssl_verify maybe;")
    config.write_text(broken)
    done = subprocess.run([*command[:1], "-t", *command[1:]], capture_output=True, check=False)
    assert done.returncode != 0  # the check can fail
