"""Deployment configs: ``site.toml`` (one site daemon) and ``coordinator.toml`` (the service).

Both are parsed once at the edge into pydantic models (kebab-case keys, unknown keys refused);
relative paths are relative to the config file's folder. The run itself (model, rounds, rule,
privacy) stays in the run config (``common.config.RunConfig``) that ``fedlora coordinator run``
submits; a site config holds only what is local to the site: its data, model location and
device, its keys bundle and how to reach the coordinator.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import Field, model_validator

from common.config import (
    DataConfig,
    DataFormat,
    ModelConfig,
    Section,
    SitePolicy,
    read_toml,
    resolve_paths,
    validate_config,
)
from common.errors import ConfigError, FedloraError
from common.keys import check_site_id

Port = Annotated[int, Field(gt=0, lt=65536)]
PositiveInt = Annotated[int, Field(gt=0)]

# The SuperLink serves Fleet, Control and Runtime APIs on one port, so it listens on an
# internal address only; the proxy (fedlora.deploy_proxy) is what sites reach, on Flower's
# usual public port, and it forwards the Fleet API alone.
DEFAULT_PROXY_PORT = 9092
DEFAULT_SUPERLINK_PORT = 9093
DEFAULT_SUPERNODE_PORT = 9094


class SiteSection(Section):
    id: str = Field(description="the site's id; its envelope key is <keys>/<id>.key")
    keys: Path = Field(description="the site's bundle from `fedlora keys init`")
    # Seeds this site's batch order; by default derived from the id (stable across restarts).
    index: Annotated[int, Field(ge=0)] | None = None
    # Refuse to start unless the local base model has exactly this fingerprint.
    expect_fingerprint: str | None = None
    # The site's own store: the adapter versions it received, its private modules, and what
    # it keeps between rounds (``client.site_store``). Default: <keys>/../<id>-state.
    state: Path | None = None
    # The groups this site expects to be in (the run's [groups] decide; a site whose groups
    # differ refuses to train, naming both). None: whatever the run says.
    groups: list[str] | None = None

    @property
    def seed_index(self) -> int:
        if self.index is not None:
            return self.index
        return int.from_bytes(hashlib.sha256(self.id.encode()).digest()[:2], "big")


class CoordinatorAddress(Section):
    address: str = Field(description="host:port of the coordinator's SuperLink")
    # The CA certificate that signed the SuperLink's TLS certificate; default <keys>/ca.crt.
    root_certificates: Path | None = None


class SiteDataSection(Section):
    """The site's own data file: no partitioning, only the held-out split."""

    path: Path
    format: DataFormat = "auto"
    text_column: str = "text"
    label_column: str = "label"
    instruction_column: str = "instruction"
    context_column: str = "context"
    response_column: str = "response"
    # Classification: the run's label names in id order (identical at every site).
    labels: list[str] | None = None
    holdout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    max_examples: PositiveInt | None = None
    # Cap on held-out examples; default: the coordinator's data.max-eval-examples.
    max_eval_examples: PositiveInt | None = None
    seed: int = 0

    def data_config(self) -> DataConfig:
        """The ``DataConfig`` that ``common.data.load_dataset`` reads this file with."""
        return DataConfig(
            path=self.path,
            format=self.format,
            text_column=self.text_column,
            label_column=self.label_column,
            instruction_column=self.instruction_column,
            context_column=self.context_column,
            response_column=self.response_column,
            holdout=self.holdout,
            seed=self.seed,
        )


class SupernodeSection(Section):
    port: Port = DEFAULT_SUPERNODE_PORT  # the SuperNode's local ClientAppIo API (127.0.0.1)
    # Reconnection to the coordinator: None = keep trying forever (survives its restarts).
    max_retries: Annotated[int, Field(ge=0)] | None = None
    max_wait_time: Annotated[float, Field(gt=0)] | None = None
    health_port: Port | None = None  # plain-gRPC health service on 127.0.0.1, for probes


class ResourcesSection(Section):
    cpu_threads: PositiveInt | None = None  # torch/OpenMP threads of the training process
    cuda_visible_devices: str | None = None  # e.g. "0" or "0,1"; "" hides every GPU


class SiteConfig(Section):
    """One site daemon: ``fedlora site start --config site.toml``."""

    site: SiteSection
    coordinator: CoordinatorAddress
    model: ModelConfig
    data: SiteDataSection
    supernode: SupernodeSection = SupernodeSection()
    resources: ResourcesSection = ResourcesSection()
    # The least this site accepts from a plan (common.site_policy): by default sealed or
    # secure-sum, never plain deltas.
    policy: SitePolicy = SitePolicy()

    @property
    def root_certificates(self) -> Path:
        return self.coordinator.root_certificates or self.site.keys / "ca.crt"

    @property
    def state_dir(self) -> Path:
        return self.site.state or self.site.keys.parent / f"{self.site.id}-state"


class CoordinatorSection(Section):
    keys: Path = Field(description="the coordinator folder from `fedlora keys init`")
    state: Path = Field(description="SuperLink database, Flower home, the active run record")
    runs: Path = Field(description="run directories: <runs>/<run name>/")
    # Where the SuperLink listens. Its port also serves the Control API (submit runs, register
    # nodes) and the Runtime API, so it must stay internal: loopback, or a container network
    # only the proxy shares (then [proxy] start = false).
    host: str = "127.0.0.1"
    port: Port = DEFAULT_SUPERLINK_PORT
    health_port: Port | None = None  # plain-gRPC health service, for container probes
    # How this machine's CLI reaches the SuperLink; must match a name in the TLS cert.
    control_address: str | None = None

    @property
    def control(self) -> str:
        return self.control_address or f"127.0.0.1:{self.port}"


class ProxySection(Section):
    """The reverse proxy on the public address: TLS, the Fleet API and health, nothing else."""

    # `fedlora coordinator start` runs nginx itself; false: it runs elsewhere (compose's
    # `proxy` service) from `fedlora coordinator proxy-config`.
    start: bool = True
    host: str = "0.0.0.0"  # the public address sites connect to
    port: Port = DEFAULT_PROXY_PORT
    # How the proxy reaches the SuperLink; default 127.0.0.1:<coordinator.port>.
    upstream: str | None = None
    # Largest request body in MiB: one Fleet object (arrays travel in 5 MiB chunks; a sealed
    # delta is one object) or a FAB (10 MB at most).
    max_body_mib: PositiveInt = 64
    nginx: str = "nginx"  # the nginx executable (name on PATH or a path)
    # The MLflow tracking UI (a run's tracking.backend = "mlflow"): host:port of `mlflow
    # server`, forwarded with TLS on a listener of its own; None: not forwarded. MLflow
    # authenticates nobody, so like the Control API it is for the coordinator host only: the
    # listener stays on loopback (an operator tunnels to it), or, where the proxy runs in a
    # container, the port is published on the host's loopback (docker-compose.yml).
    mlflow_upstream: str | None = None
    mlflow_host: str = "127.0.0.1"
    mlflow_port: Port = 5443


def _check_mlflow_listener(proxy: ProxySection) -> None:
    """The tracking UI's listener: loopback where nginx runs on this host, a port of its own."""
    if proxy.start and not is_loopback(proxy.mlflow_host):
        raise ValueError(
            f"proxy.mlflow-host = {proxy.mlflow_host!r} would put the MLflow UI, which "
            "authenticates nobody, on a public address; keep 127.0.0.1 and reach it through an "
            "SSH tunnel"
        )
    if proxy.mlflow_port == proxy.port:
        raise ValueError(
            f"proxy.mlflow-port = {proxy.mlflow_port} is also proxy.port: the Fleet API and "
            "the MLflow UI need a listener each"
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, IPv6 with or without brackets) is loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class CoordinatorConfig(Section):
    """The coordinator service: ``fedlora coordinator start --config coordinator.toml``."""

    coordinator: CoordinatorSection
    # None: nothing public (the SuperLink on loopback, sites on this host only).
    proxy: ProxySection | None = None

    @model_validator(mode="after")
    def _superlink_stays_internal(self) -> CoordinatorConfig:
        c, proxy = self.coordinator, self.proxy
        if not is_loopback(c.host) and (proxy is None or proxy.start):
            raise ValueError(
                f"coordinator.host = {c.host!r} would put the SuperLink's Control API (submit "
                "runs, register nodes) on a public address; use 127.0.0.1 and a [proxy] "
                "section, or set [proxy] start = false where an external proxy reaches it over "
                "an internal network (docker-compose.yml)"
            )
        if proxy is not None and proxy.start and proxy.port == c.port:
            raise ValueError(
                f"proxy.port = {proxy.port} is also coordinator.port: the proxy and the "
                "SuperLink need a port each"
            )
        if proxy is not None and proxy.mlflow_upstream is not None:
            _check_mlflow_listener(proxy)
        return self

    @property
    def upstream(self) -> str:
        """How the proxy reaches the SuperLink."""
        proxy = self.proxy
        if proxy is not None and proxy.upstream is not None:
            return proxy.upstream
        return f"127.0.0.1:{self.coordinator.port}"


_PATHS: dict[str, tuple[str, ...]] = {
    "site": ("keys", "state"),
    "coordinator": ("root-certificates", "keys", "state", "runs"),
    "data": ("path",),
}

Model = TypeVar("Model", SiteConfig, CoordinatorConfig)


def _load(path: Path, model: type[Model]) -> Model:
    path = Path(path)
    raw = read_toml(path)
    # Site and coordinator files are read by daemons that may chdir: resolve absolutely.
    resolve_paths(raw, path.resolve().parent, _PATHS)
    return validate_config(model, raw, str(path))


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate ``site.toml``; every problem is a ``ConfigError`` naming the key."""
    cfg = _load(path, SiteConfig)
    try:
        check_site_id(cfg.site.id)
    except FedloraError as exc:
        raise ConfigError(f"{path}: site.id: {exc}") from None
    return cfg


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    """Read and validate ``coordinator.toml``."""
    return _load(path, CoordinatorConfig)
