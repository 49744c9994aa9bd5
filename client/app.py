"""The Flower ``ClientApp``: glue between Flower messages and ``client.site.SiteRuntime``.

A train instruction carries the global adapter and a header (round, version, base fingerprint,
site plan); the reply carries the *encoded delta* and metrics. Nothing else leaves the site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.site_api import Site, SiteUpdate
from common import protocol as P
from common.adapters import AdapterState
from common.config import RunConfig, SitePlan, SitePolicy, simulation_policy
from common.encoding import encode_delta
from common.envelope import EnvelopeContext, seal_delta
from common.errors import DataError, FedloraError, UpdateRejected
from common.evaluation import EvalResult
from common.instructions import INSTRUCTION_PUBLIC_NAME, verify_instruction
from common.keys import (
    COORDINATOR_KEY_NAME,
    PRIVATE_SUFFIX,
    CoordinatorPublicKey,
    KeyMaterialError,
    load_coordinator_public,
    load_site_private,
    load_site_public,
    public_path_for,
)
from common.modules import join_modules, site_modules, split_modules
from common.progress import print_step
from common.roster import ENROLL_PUBLIC_NAME
from common.site_policy import check_plan

if TYPE_CHECKING:  # the simulation's in-process sites: torch, transformers, peft, datasets
    from client.site import SiteRuntime
    from common.adapter_host import AdapterHost
    from common.data import Dataset

logger = logging.getLogger(__name__)

# Largest encoded step from the coordinator (bytes): an fp32 step of 2 GiB of adapter state,
# the worker wire's bound on what a site receives.
_MAX_STEP_BYTES = 2 * 2**30
# Error codes of refusal replies (Flower reserves small codes for its own errors).
ERROR_REFUSED = 1001

# Ray actors serve many rounds (and several virtual sites) in one process: loading a base model
# costs 1-25 s and ~0.5 GB, so each process keeps one host per model and module, and the data.
# Imported where used: a deployed site's per-message ClientApp process, a thin client of the
# site's resident worker, never loads transformers, peft or datasets (seconds per message).
_HOSTS: dict[str, AdapterHost] = {}
_DATASETS: dict[str, Dataset] = {}
# A virtual site's runtime, kept so that its split and its tokenized examples are made once
# per process, not once per message (the partition and tokenizer cost ~0.5 s per message on
# banking77, paid by every site every round).
_RUNTIMES: dict[str, SiteRuntime] = {}


def release_site_caches() -> None:
    """Forget this process's hosts, data sets and virtual sites: what a Ray worker takes with it
    when it exits, released after a simulation that ran its sites in this process (a sweep's
    next setting would otherwise keep every earlier setting's base model in memory)."""
    _HOSTS.clear()
    _DATASETS.clear()
    _RUNTIMES.clear()


def _dataset(cfg: RunConfig) -> Dataset:
    from common.data import load_dataset

    key = str(cfg.data.path)
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(cfg.data)
    return _DATASETS[key]


def _host(cfg: RunConfig, plan: SitePlan, site_id: str, num_labels: int | None) -> AdapterHost:
    """The process's host for the modules ``site_id`` holds (sites of one group share one)."""
    from common.adapter_host import AdapterHost

    modules = site_modules(plan.modules, plan.groups, site_id)
    held = ",".join(f"{name}={m.model_dump_json()}" for name, m in modules.items())
    key = f"{cfg.model.model_dump_json()}|{held}|{num_labels}"
    if key not in _HOSTS:
        _HOSTS[key] = AdapterHost(cfg.model, modules, num_labels)
    return _HOSTS[key]


def _runtime(cfg: RunConfig, plan: SitePlan, context: Context, sites_dir: Path) -> SiteRuntime:
    from client.site import SiteRuntime
    from client.site_store import SiteStore
    from common.partition import site_data

    index = int(context.node_config.get("partition-id", 0))
    num_sites = int(context.node_config.get("num-partitions", cfg.federation.sites))
    site_id = f"site-{index}"
    dataset = _dataset(cfg)
    labels = dataset.label_names
    host = _host(cfg, plan, site_id, len(labels) if labels else None)
    key = f"{site_id}|{num_sites}|{sites_dir}|{cfg.data.model_dump_json()}|{id(host)}"
    if key not in _RUNTIMES:
        data = site_data(dataset, index, num_sites, cfg.data)
        store = SiteStore(sites_dir / site_id)
        _RUNTIMES[key] = SiteRuntime(host, data, dataset.kind, site_id, index, store)
    return _RUNTIMES[key]


def _header(msg: Message) -> tuple[ConfigRecord, SitePlan]:
    header = msg.content.config_records[P.HEADER_RECORD]
    return header, SitePlan.model_validate_json(str(header[P.KEY_PLAN]))


def _global(msg: Message, site: Site, header: ConfigRecord) -> AdapterState:
    """The instruction's global version, rebuilt from its form (full, step or reference),
    checked against the header's SHA-256 and kept in the site's store (``client.received``)."""
    from client.received import rebuild_global

    form = str(header.get(P.KEY_GLOBAL_FORM, P.FORM_FULL))
    arrays = msg.content.array_records.get(P.GLOBAL_RECORD)
    step = msg.content.config_records.get(P.GLOBAL_STEP_RECORD)
    payload = None if step is None else step.get(P.KEY_DELTA)
    base = header.get(P.KEY_GLOBAL_BASE)
    digest = header.get(P.KEY_GLOBAL_SHA256)
    return rebuild_global(
        form,
        int(str(header[P.KEY_VERSION])),
        None if digest is None else str(digest),
        site.received_versions(str(header[P.KEY_RUN_ID])),
        full=None if arrays is None else arrays.to_torch_state_dict(),
        step=payload if isinstance(payload, bytes) else None,
        base=base if isinstance(base, int) and not isinstance(base, bool) else None,
        max_bytes=_MAX_STEP_BYTES,
    )


def _control(msg: Message, plan: SitePlan) -> AdapterState | None:
    """SCAFFOLD's ``c`` from a train instruction (``plan.train.scaffold``), else None."""
    if not plan.train.scaffold:
        return None
    record = msg.content.array_records.get(P.CONTROL_RECORD)
    if record is None:
        raise UpdateRejected("the plan asks for SCAFFOLD but the instruction carries no c")
    return record.to_torch_state_dict()


@dataclass(frozen=True)
class _SecureSumKeys:
    signing: Ed25519PrivateKey  # the site's own identity key
    peers: dict[int, Ed25519PublicKey]  # by secure-sum number, from the signed roster
    serial: int  # the roster's serial: remembered once the instruction is acted on


def _secure_sum_keys(keys: SiteKeys | None, site: Site, header: ConfigRecord) -> _SecureSumKeys:
    """The site's signing key, and its peers' keys from the signed roster in ``header``
    (refused if the site has accepted a newer roster before; nothing is remembered yet)."""
    from client.secure_sum import peer_keys
    from common.roster import roster_serial

    if keys is None:
        raise KeyMaterialError("secure sum needs the site's keys; none configured")
    enroll = keys.enroll_key(site.site_id)
    peers = peer_keys(header, enroll)
    serial = roster_serial(header.get(P.KEY_ROSTER), enroll)  # type: ignore[arg-type]
    site.check_roster(serial)
    return _SecureSumKeys(keys.load(site.site_id)[1], peers, serial)


def _later_stage(
    msg: Message,
    context: Context,
    site: Site,
    header: ConfigRecord,
    stage: str,
    secure: _SecureSumKeys,
) -> Message:
    """Secure-sum stages 2-5 (no training, no adapter): the site's reply."""
    from client.secure_sum import continue_round  # dp_accounting, scipy: ~2.5 s

    payload = msg.content.config_records[P.SECAGG_RECORD]
    if stage == P.STAGE_MASK:  # the redo rule: one masked input per (run, round)
        site.claim_masked_input(str(header[P.KEY_RUN_ID]), int(str(header[P.KEY_ROUND])))
    content = continue_round(context, stage, payload, secure.signing, secure.peers)
    content.config_records[P.UPDATE_RECORD] = ConfigRecord({P.KEY_SITE: site.site_id})
    site.accept_roster(secure.serial)
    return Message(content, reply_to=msg)


def _report(update: SiteUpdate) -> dict[str, int | float]:
    """What training cost and how the site's delta was clipped (``P.REPORT_KEYS``)."""
    return {
        P.METRIC_EXAMPLES: update.examples,
        P.METRIC_TRAIN_LOSS: update.result.loss,
        P.METRIC_SECONDS: update.result.seconds,
        P.METRIC_PEAK_MEMORY: update.result.peak_memory_bytes,
        P.METRIC_STEPS: update.result.steps,
        P.METRIC_CLIP_SCALE: update.clip_scale,
    }


def _describe(
    content: RecordDict, site: Site, header: ConfigRecord, plan: SitePlan, update: SiteUpdate
) -> None:
    """Add who sent a train reply and for which round/version; its figures only in the clear
    in mode ``none`` (sealed mode seals them with the delta, secure-sum does not send them)."""
    record = content.config_records.setdefault(P.UPDATE_RECORD, ConfigRecord())
    record[P.KEY_SITE] = site.site_id
    record[P.KEY_FINGERPRINT] = site.fingerprint
    record[P.KEY_ROUND] = int(str(header[P.KEY_ROUND]))
    record[P.KEY_VERSION] = int(str(header[P.KEY_VERSION]))
    record[P.KEY_ENCODING] = plan.encoding
    if plan.privacy_mode == "none":
        content.metric_records[P.METRICS_RECORD] = MetricRecord(dict(_report(update)))


def public_reason(exc: Exception) -> str:
    """What a refusal tells the coordinator: a data error only by its kind.

    A data error quotes the site's own rows, labels and paths, which are the site's private
    data; the full message stays in the site's log.
    """
    if isinstance(exc, DataError):
        return "the site's data failed a check (the details are in the site's own log)"
    return str(exc)


def _refuse(msg: Message, exc: Exception) -> Message:
    logger.error("refusing %s instruction: %s", msg.metadata.message_type, exc)
    return Message(Error(code=ERROR_REFUSED, reason=public_reason(exc)), reply_to=msg)


@dataclass(frozen=True)
class SiteKeys:
    """A site's keys: ``<folder>/coordinator.pub`` (seal to), ``<folder>/<site-id>.key`` (sign
    with) and ``<folder>/coordinator-sign.pub`` (the coordinator's pinned instruction key)."""

    folder: Path

    def load(self, site_id: str) -> tuple[CoordinatorPublicKey, Ed25519PrivateKey]:
        public = load_coordinator_public(public_path_for(self.folder / COORDINATOR_KEY_NAME))
        return public, load_site_private(self.folder / f"{site_id}{PRIVATE_SUFFIX}")

    def instruction_key(self, site_id: str) -> Ed25519PublicKey:
        """The public key every instruction to ``site_id`` must be signed with."""
        return load_site_public(self.folder / INSTRUCTION_PUBLIC_NAME)

    def enroll_key(self, site_id: str) -> Ed25519PublicKey:
        """The enrollment authority's key, which signs the roster of site keys."""
        return load_site_public(self.folder / ENROLL_PUBLIC_NAME)


# The policy a site applies to the plans it receives, by site id (``common.site_policy``).
PolicyProvider = Callable[[str], SitePolicy]


def _admit(
    msg: Message,
    site: Site,
    header: ConfigRecord,
    plan: SitePlan,
    keys: SiteKeys | None,
    policy: PolicyProvider,
) -> None:
    """Refuse (raise) an instruction without the pinned coordinator signature, or whose plan
    is below the site's policy. A site with keys never acts on an unsigned instruction."""
    if keys is not None:
        verify_instruction(
            msg.content, msg.metadata.message_type, keys.instruction_key(site.site_id)
        )
    earlier = site.ledger.earlier(str(header[P.KEY_RUN_ID]))
    check_plan(policy(site.site_id), plan, header, earlier)


def _seal(
    payload: bytes, module: str, header: ConfigRecord, site: Site, keys: SiteKeys | None
) -> bytes:
    """``payload`` sealed to the coordinator and signed by the site, bound to this round,
    version and ``module`` (a module name, or a report's reserved ``@...`` name)."""
    if keys is None:
        raise KeyMaterialError("this privacy mode seals replies, but the site has no keys")
    coordinator, signing = keys.load(site.site_id)
    context = EnvelopeContext(
        run_id=str(header[P.KEY_RUN_ID]),
        round=int(str(header[P.KEY_ROUND])),
        site_id=site.site_id,
        module=module,
        version=int(str(header[P.KEY_VERSION])),
        base_fingerprint=site.fingerprint,
    )
    return seal_delta(payload, coordinator, signing, context)


def _encoded_deltas(
    update: SiteUpdate, plan: SitePlan, header: ConfigRecord, site: Site
) -> dict[str, bytes]:
    """Each sent module's delta in the plan's encoding; with error feedback, plus the residual
    kept after the round before, the new residual kept for the next (``common.error_feedback``;
    by round, so a redone round sends the same values)."""
    deltas = split_modules(update.delta)
    if not plan.error_feedback:
        return {module: encode_delta(delta, plan.encoding) for module, delta in deltas.items()}
    from common.error_feedback import encode_with_feedback

    residuals = site.residuals(str(header[P.KEY_RUN_ID]))
    server_round = int(str(header[P.KEY_ROUND]))
    kept = split_modules(residuals.load(before=server_round))
    payloads = {}
    for module, delta in deltas.items():
        payloads[module], kept[module] = encode_with_feedback(
            delta, kept.get(module, {}), plan.encoding
        )
    residuals.save(server_round, join_modules(kept))  # modules not sent keep theirs
    return payloads


def _wire_payloads(
    update: SiteUpdate,
    plan: SitePlan,
    header: ConfigRecord,
    site: Site,
    keys: SiteKeys | None,
) -> ConfigRecord:
    """One payload per sent module: encoded and, in sealed mode, sealed and signed; in sealed
    mode also the site's report (``P.KEY_REPORT``), sealed the same way.

    Each envelope is bound to its module, so one module's delta cannot be passed off as
    another's, nor a report as a delta.
    """
    record = ConfigRecord()
    sealed = plan.privacy_mode == "sealed"
    for module, payload in sorted(_encoded_deltas(update, plan, header, site).items()):
        record[P.delta_key(module)] = (
            _seal(payload, module, header, site, keys) if sealed else payload
        )
    for module, change in sorted(split_modules(update.control or {}).items()):
        payload = encode_delta(change, plan.encoding)
        bound = P.control_envelope_module(module)
        record[P.control_key(module)] = (
            _seal(payload, bound, header, site, keys) if sealed else payload
        )
    if sealed:
        report = P.report_bytes(_report(update))
        record[P.KEY_REPORT] = _seal(report, P.REPORT_MODULE, header, site, keys)
    return record


def _evaluate_reply(
    result: EvalResult, plan: SitePlan, header: ConfigRecord, site: Site, keys: SiteKeys | None
) -> RecordDict:
    """The evaluate figures: sealed and signed where the mode has keys, else in the clear."""
    metrics: dict[str, int | float] = {
        P.METRIC_EXAMPLES: result.examples,
        P.METRIC_EVAL_LOSS: result.loss,
        P.METRIC_EVAL_TOKENS: result.tokens,
    }
    if result.accuracy is not None:
        metrics[P.METRIC_EVAL_ACCURACY] = result.accuracy
    update = ConfigRecord(
        {
            P.KEY_SITE: site.site_id,
            P.KEY_ROUND: int(str(header[P.KEY_ROUND])),
            P.KEY_VERSION: int(str(header[P.KEY_VERSION])),
        }
    )
    if plan.privacy_mode == "none":
        content = RecordDict({P.METRICS_RECORD: MetricRecord(dict(metrics))})
    else:
        report = P.report_bytes(metrics)
        update[P.KEY_REPORT] = _seal(report, P.EVAL_REPORT_MODULE, header, site, keys)
        content = RecordDict()
    content.config_records[P.UPDATE_RECORD] = update
    return content


# How the app finds the site a message is for: simulation partitions one data set in process;
# a deployed site asks its daemon's resident worker (``RemoteSite``) or, without one, loads
# its own data and model in process.
SiteProvider = Callable[[SitePlan, Context], Site]


def simulation_sites(cfg: RunConfig, sites_dir: Path) -> SiteProvider:
    """Virtual sites: node ``partition-id`` i is ``site-<i>`` with partition i of ``cfg.data``.

    ``sites_dir``: where each site's store lives (``<sites_dir>/site-<i>``). On disk, not in
    memory: Ray may serve a site's next message from another worker process.
    """

    def provide(plan: SitePlan, context: Context) -> Site:
        return _runtime(cfg, plan, context, sites_dir)

    return provide


def make_client_app(cfg: RunConfig, keys: SiteKeys | None, sites_dir: Path) -> ClientApp:
    """A ClientApp whose virtual sites read their partition of ``cfg.data`` and all apply
    ``cfg.site-policy``."""
    return client_app(simulation_sites(cfg, sites_dir), keys, lambda _site: cfg.site_policy)


def client_app(
    sites: SiteProvider,
    keys: SiteKeys | None = None,
    policy: PolicyProvider = lambda _site: simulation_policy(),
) -> ClientApp:
    """The fedlora ClientApp: train and evaluate instructions for the sites ``sites`` gives.

    With ``keys``, every instruction must carry the coordinator's signature (the key pinned in
    ``keys``); every plan must meet the site's ``policy``.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            header, plan = _header(msg)
            site = sites(plan, context)
            _admit(msg, site, header, plan, keys, policy)
            site.check_fingerprint(str(header[P.KEY_FINGERPRINT]))
            stage = str(header.get(P.KEY_STAGE, P.STAGE_TRAIN))
            secure = None
            if stage != P.STAGE_TRAIN or plan.privacy_mode == "secure-sum":
                # The roster before anything is spent: an instruction relaying an old roster
                # gets no training and does not use up the round's one masked input. It is
                # remembered only once the instruction is acted on (changes nothing otherwise).
                secure = _secure_sum_keys(keys, site, header)
            if secure is not None and stage != P.STAGE_TRAIN:
                return _later_stage(msg, context, site, header, stage, secure)
            server_round = int(str(header[P.KEY_ROUND]))
            update = site.train(
                _global(msg, site, header),
                plan,
                server_round,
                int(str(header[P.KEY_VERSION])),
                _progress(site.site_id, server_round),
                str(header[P.KEY_RUN_ID]),
                _control(msg, plan),
            )
            if plan.dp is not None and plan.clip is not None:  # before anything is sent
                site.ledger.record(
                    str(header[P.KEY_RUN_ID]), server_round, plan.dp.noise_multiplier
                )
            if secure is not None:
                from client.secure_sum import start_round

                content = start_round(
                    context,
                    header,
                    site.site_id,
                    secure.signing,
                    update,
                    plan.site_noise_std,
                    secure.peers,
                )
                site.accept_roster(secure.serial)
            else:
                payloads = _wire_payloads(update, plan, header, site, keys)
                content = RecordDict({P.UPDATE_RECORD: payloads})
        except (FedloraError, KeyError) as exc:
            return _refuse(msg, exc)
        _describe(content, site, header, plan, update)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            header, plan = _header(msg)
            site = sites(plan, context)
            _admit(msg, site, header, plan, keys, policy)
            site.check_fingerprint(str(header[P.KEY_FINGERPRINT]))
            version, run_id = int(str(header[P.KEY_VERSION])), str(header[P.KEY_RUN_ID])
            result = site.evaluate(_global(msg, site, header), plan, version, run_id)
            content = _evaluate_reply(result, plan, header, site, keys)
        except FedloraError as exc:
            return _refuse(msg, exc)
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Identify: which site this node is, so that the coordinator can sample cohorts by
        site id (``server.cohort``). Nothing but the id the site names in every reply."""
        try:
            header, plan = _header(msg)
            site = sites(plan, context)
            _admit(msg, site, header, plan, keys, policy)
        except (FedloraError, KeyError) as exc:
            return _refuse(msg, exc)
        claim = ConfigRecord({P.KEY_SITE: site.site_id})
        return Message(RecordDict({P.UPDATE_RECORD: claim}), reply_to=msg)

    return app


def _progress(site_id: str, server_round: int) -> Callable[[int, int, float], None]:
    def on_step(step: int, steps: int, loss: float) -> None:
        print_step(site_id, server_round, step, steps, loss)

    return on_step
