"""The deployed site's ClientApp: ``client.app.client_app`` fed from the site's own config.

A SuperNode started by ``fedlora site start`` carries ``site-config="/abs/site.toml"`` and
``site-worker="/abs/worker.sock"`` in its node config. Flower starts a fresh ClientApp process
for every message, so the site's model and data live in the site daemon's resident worker
(``client.worker``) and each message's site is a ``RemoteSite`` of it; the ClientApp process
itself only decodes, seals and signs (no transformers, peft or datasets imported).

Without ``site-worker`` (a SuperNode started by hand), the site is built in the ClientApp
process from the config file (the site's own data file, no partitioning, only the held-out
split; its own model location and device), and the process keeps each runtime it built.

In a ``flwr run .`` simulation (``common.app_run_config``) the same component serves virtual
sites instead: ``client.app.make_client_app`` over the run's config and keys folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import SiteKeys, client_app, make_client_app
from client.remote_site import RemoteSite
from client.site_api import Site
from common.app_run_config import SimulatedRun, simulated_run
from common.config import SitePlan, SitePolicy, load_config
from common.errors import ConfigError
from common.keys import CoordinatorPublicKey, KeyMaterialError
from common.modules import site_groups, site_modules
from common.site_config import SiteConfig, load_site_config

if TYPE_CHECKING:  # torch, transformers, peft, datasets: imported where a site is built
    from client.site import SiteRuntime
    from common.data import Kind, SiteData
    from common.models import LoadedBase

NODE_CONFIG_KEY = "site-config"
WORKER_CONFIG_KEY = "site-worker"

# Per process: one runtime per (site config, module and task), and each site's keys bundle.
_RUNTIMES: dict[str, SiteRuntime] = {}
_BUNDLES: dict[str, Path] = {}
# Site id -> the [policy] of its site.toml, loaded with the bundle.
_POLICIES: dict[str, SitePolicy] = {}


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
    from common.data import load_dataset
    from common.partition import split_holdout

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


def check_site_groups(cfg: SiteConfig, plan: SitePlan) -> None:
    """Refuse a run that puts this site in other groups than its config declares."""
    run = site_groups(plan.groups, cfg.site.id)
    if cfg.site.groups is not None and sorted(cfg.site.groups) != run:
        raise ConfigError(
            f"site.groups = {sorted(cfg.site.groups)} in the site config, but the run's [groups] "
            f"put {cfg.site.id} in {run}; ask the coordinator's operator, or change site.groups"
        )


@dataclass(frozen=True)
class PreloadedBase:
    """A base model already loaded from the site config (by the daemon's start-up check)."""

    base: LoadedBase
    num_labels: int | None  # the classes it was loaded with (None: causal LM)


def build_runtime(
    cfg: SiteConfig, plan: SitePlan, preloaded: PreloadedBase | None = None
) -> SiteRuntime:
    """Load the site's data and base model, attach the modules the plan gives this site.

    ``preloaded`` is used instead of loading the base again when its label count is the
    run's; LoRA is then injected into it in place, so it serves one runtime only.
    """
    from client.site import SiteRuntime
    from client.site_store import SiteStore
    from common.adapter_host import AdapterHost

    if plan.task != cfg.model.task:
        raise ConfigError(
            f"model.task = {cfg.model.task!r} in the site config, but the run trains "
            f"{plan.task!r}; set model.task to match the coordinator's run"
        )
    data, kind, labels = load_site_data(cfg, plan.max_eval_examples, run_label_names(cfg, plan))
    reuse = preloaded.base if preloaded and preloaded.num_labels == (labels or None) else None
    check_site_groups(cfg, plan)
    modules = site_modules(plan.modules, plan.groups, cfg.site.id)
    host = AdapterHost(cfg.model, modules, labels or None, reuse)
    store = SiteStore(cfg.state_dir)
    return SiteRuntime(host, data, kind, cfg.site.id, cfg.site.seed_index, store)


def runtime_key(plan: SitePlan) -> str:
    """What a built runtime depends on besides the site config: task, modules, labels, eval cap."""
    modules = {name: m.model_dump(mode="json") for name, m in plan.modules.items()}
    return f"{plan.task}|{modules}|{plan.groups}|{plan.labels}|{plan.max_eval_examples}"


def node_site(plan: SitePlan, context: Context) -> Site:
    """The ``SiteProvider`` of a deployed SuperNode: its ``site-config`` file's site."""
    if NODE_CONFIG_KEY not in context.node_config:
        raise ConfigError(
            f"this SuperNode has no {NODE_CONFIG_KEY!r} in its node config; start it with "
            "`fedlora site start --config site.toml`"
        )
    path = str(context.node_config[NODE_CONFIG_KEY])
    if WORKER_CONFIG_KEY in context.node_config:
        cfg = load_site_config(Path(path))  # for the keys bundle: a TOML file, milliseconds
        _BUNDLES[cfg.site.id] = cfg.site.keys
        _POLICIES[cfg.site.id] = cfg.policy
        return RemoteSite(Path(str(context.node_config[WORKER_CONFIG_KEY])), plan, cfg.state_dir)
    key = f"{path}|{runtime_key(plan)}"
    if key not in _RUNTIMES:
        cfg = load_site_config(Path(path))
        _RUNTIMES[key] = build_runtime(cfg, plan)
        _BUNDLES[cfg.site.id] = cfg.site.keys
        _POLICIES[cfg.site.id] = cfg.policy
    return _RUNTIMES[key]


class BundleKeys(SiteKeys):
    """Sealing keys from the bundle of the site ``node_site`` loaded for this process."""

    def __init__(self) -> None:
        super().__init__(Path())

    def load(self, site_id: str) -> tuple[CoordinatorPublicKey, Ed25519PrivateKey]:
        if site_id not in _BUNDLES:
            raise KeyMaterialError(f"no keys bundle is known for site {site_id!r}")
        return SiteKeys(_BUNDLES[site_id]).load(site_id)

    def instruction_key(self, site_id: str) -> Ed25519PublicKey:
        if site_id not in _BUNDLES:
            raise KeyMaterialError(f"no keys bundle is known for site {site_id!r}")
        return SiteKeys(_BUNDLES[site_id]).instruction_key(site_id)

    def enroll_key(self, site_id: str) -> Ed25519PublicKey:
        if site_id not in _BUNDLES:
            raise KeyMaterialError(f"no keys bundle is known for site {site_id!r}")
        return SiteKeys(_BUNDLES[site_id]).enroll_key(site_id)


def node_policy(site_id: str) -> SitePolicy:
    """The policy of the site ``node_site`` loaded (its ``site.toml`` ``[policy]``)."""
    if site_id not in _POLICIES:
        raise KeyMaterialError(f"no site config is known for site {site_id!r}")
    return _POLICIES[site_id]


DEPLOYED_APP = client_app(node_site, BundleKeys(), node_policy)
# Per process: a simulation's ClientApp for each run (its config parsed once).
_SIMULATED: dict[SimulatedRun, ClientApp] = {}


def app_for(context: Context) -> ClientApp:
    """The deployed site's ClientApp, or the virtual sites' of a ``flwr run .`` simulation."""
    run = simulated_run(context.run_config, context.run_id)
    if run is None:
        return DEPLOYED_APP
    if NODE_CONFIG_KEY in context.node_config:
        raise ConfigError(
            "this run names no coordinator keys folder (run config 'keys'), so it is a "
            "`flwr run .` simulation; a deployed site takes part only in runs that "
            "`fedlora coordinator run` submits"
        )
    if run not in _SIMULATED:
        cfg = load_config(run.config)
        keys = None if cfg.privacy.mode == "none" else SiteKeys(run.keys)
        _SIMULATED[run] = make_client_app(cfg, keys, run.sites)
    return _SIMULATED[run]


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return app_for(context)(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return app_for(context)(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return app_for(context)(msg, context)
