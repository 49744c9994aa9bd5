"""The deployed site's ClientApp: ``client.app.client_app`` fed from the site's own config.

A SuperNode started by ``fedlora site start`` carries ``site-config="/abs/site.toml"`` in its
node config; each instruction's site is built from that file (the site's own data file, no
partitioning, only the held-out split; its own model location and device; its keys bundle).
Loading a base costs 1-25 s, so a process keeps each site runtime it built.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context

from client.app import SiteKeys, client_app
from client.data import Kind, SiteData, load_dataset, split_holdout
from client.site import AdapterHost, SiteRuntime
from common.config import SitePlan
from common.errors import ConfigError
from common.keys import CoordinatorPublicKey, KeyMaterialError
from common.site_config import SiteConfig, load_site_config

NODE_CONFIG_KEY = "site-config"

# Per process: one runtime per (site config, module and task), and each site's keys bundle.
_RUNTIMES: dict[str, SiteRuntime] = {}
_BUNDLES: dict[str, Path] = {}


def run_label_names(cfg: SiteConfig, plan: SitePlan) -> list[str] | None:
    """The label names the site numbers its labels by: the run's, checked against its own."""
    if cfg.data.labels is not None and plan.labels is not None and cfg.data.labels != plan.labels:
        raise ConfigError(
            f"data.labels in the site config ({len(cfg.data.labels)} names) differ from the "
            f"run's ({len(plan.labels)} names, in id order); remove data.labels from the site "
            "config to use the run's, or make them identical"
        )
    return plan.labels if plan.labels is not None else cfg.data.labels


def load_site_data(
    cfg: SiteConfig, max_eval_examples: int | None, label_names: list[str] | None = None
) -> tuple[SiteData, Kind, int]:
    """The site's examples split into train/held-out; also the data kind and label count."""
    dataset = load_dataset(cfg.data.data_config(), label_names=label_names or cfg.data.labels)
    data = split_holdout(
        dataset.examples,
        cfg.data.holdout,
        cfg.data.seed,
        cfg.data.max_examples,
        cfg.data.max_eval_examples or max_eval_examples,
    )
    if not data.train:
        raise ConfigError(f"data.path: {cfg.data.path} leaves no example to train on")
    labels = len(dataset.label_names) if dataset.label_names else 0
    return data, dataset.kind, labels


def build_runtime(cfg: SiteConfig, plan: SitePlan) -> SiteRuntime:
    """Load the site's data and base model, attach the plan's shared LoRA module."""
    if plan.task != cfg.model.task:
        raise ConfigError(
            f"model.task = {cfg.model.task!r} in the site config, but the run trains "
            f"{plan.task!r}; set model.task to match the coordinator's run"
        )
    data, kind, labels = load_site_data(cfg, plan.max_eval_examples, run_label_names(cfg, plan))
    host = AdapterHost(cfg.model, plan.modules["shared"], labels or None)
    return SiteRuntime(host, data, kind, site_id=cfg.site.id, site_index=cfg.site.seed_index)


def node_site(plan: SitePlan, context: Context) -> SiteRuntime:
    """The ``SiteProvider`` of a deployed SuperNode: its ``site-config`` file's site."""
    if NODE_CONFIG_KEY not in context.node_config:
        raise ConfigError(
            f"this SuperNode has no {NODE_CONFIG_KEY!r} in its node config; start it with "
            "`fedlora site start --config site.toml`"
        )
    path = str(context.node_config[NODE_CONFIG_KEY])
    key = f"{path}|{plan.task}|{plan.modules['shared'].model_dump_json()}"
    if key not in _RUNTIMES:
        cfg = load_site_config(Path(path))
        _RUNTIMES[key] = build_runtime(cfg, plan)
        _BUNDLES[cfg.site.id] = cfg.site.keys
    return _RUNTIMES[key]


class BundleKeys(SiteKeys):
    """Sealing keys from the bundle of the site ``node_site`` loaded for this process."""

    def __init__(self) -> None:
        super().__init__(Path())

    def load(self, site_id: str) -> tuple[CoordinatorPublicKey, Ed25519PrivateKey]:
        if site_id not in _BUNDLES:
            raise KeyMaterialError(f"no keys bundle is known for site {site_id!r}")
        return SiteKeys(_BUNDLES[site_id]).load(site_id)


app = client_app(node_site, BundleKeys())
