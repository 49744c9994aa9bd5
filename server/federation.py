"""The coordinator's round loop: instruct, aggregate, publish a version, evaluate, record.

Round 0 evaluates the initial adapter (LoRA B = 0, so it *is* the base model) so that every
later round can be compared with the untouched base.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common import protocol as P
from common.adapter_host import AdapterHost
from common.adapters import AdapterState, AggregationError, num_parameters, state_num_bytes
from common.atomic import write_json_atomic
from common.config import RunConfig, config_to_dict, site_plan
from common.data import Dataset, Example, load_dataset
from common.dp import PrivacyBudgetExceeded
from common.errors import ConfigError, StorageError
from common.evaluation import evaluate_encoded
from common.model_names import model_license
from common.models import peak_memory_bytes
from common.modules import join_modules, module_members, split_modules
from common.partition import eval_sample, partition
from common.progress import RoundClock, print_message, print_rule
from common.registry import Registry
from common.registry_format import ADAPTER_FILE, RegistryVersion
from common.sampling import STAGE_EVALUATE, STAGE_TRAIN
from common.scopes import PRIVATE, SHARED
from common.secagg import SecAggError
from common.tokens import encode_examples
from server.audit import (
    AUDIT_FILE,
    EVENT_COHORT_SAMPLED,
    EVENT_REPLY_ACCEPTED,
    EVENT_REPLY_REJECTED,
    EVENT_ROUND_COMPLETED,
    EVENT_ROUND_FAILED,
    EVENT_ROUND_STARTED,
    EVENT_RUN_RESUMED,
    EVENT_RUN_STARTED,
    EVENT_RUN_STOPPED,
    EVENT_SITE_SEEN,
    EVENT_VERSION_PUBLISHED,
    AuditLog,
    audit_mac_key,
    clip_text,
    read_entries,
)
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_digest,
    load_checkpoint,
    save_checkpoint,
)
from server.cohort import Cohort, CohortSampler
from server.init_from import InitSource, check_init_sources, read_init_sources
from server.metrics import read_metrics, record_round, report_round, run_summary, truncate_metrics
from server.secure_sum import SecureSumRound
from server.strategy import FedLoraStrategy, Sealing, StageLog, wait_for_nodes
from server.tracking import Tracker, check_backend, open_tracker

logger = logging.getLogger(__name__)


@dataclass
class Coordinator:
    """What the coordinator holds for a run: its base model + adapter, data facts, outputs."""

    cfg: RunConfig
    out_dir: Path
    host: AdapterHost
    labels: list[str] | None  # classification label names in id order
    eval_set: Dataset | None
    registry: Registry
    run_id: str
    config_digest: str
    audit: AuditLog
    sealing: Sealing | None = None
    # federation.init-from: where the modules' version 0 comes from (load_inputs checked it).
    init_from: dict[str, InitSource] = field(default_factory=dict)
    # federation.fraction-*: draws each stage's cohort (run_federation sets it); None = none.
    sampler: CohortSampler | None = None
    # tracking.backend: where rounds and versions are mirrored (run_federation opens it).
    tracker: Tracker = field(default_factory=Tracker)

    @property
    def eval_examples(self) -> list[Example]:
        """The global eval sample: seeded, so the same examples every round and on resume."""
        if self.eval_set is None:
            return []
        return eval_sample(
            self.eval_set.examples, self.cfg.data.max_eval_examples, self.cfg.data.seed
        )


def run_labels(cfg: RunConfig, deployed: bool) -> tuple[list[str] | None, Dataset | None]:
    """The run's label names and the optional global eval set, checked before any model loads.

    Simulation reads ``data.path`` and checks that it splits into the configured sites. A
    deployed coordinator never reads it (the sites hold the data): its label names come from
    ``data.labels``, else from ``data.eval-path``; a classification run without either is a
    ConfigError, since sites could otherwise number their labels differently.
    """
    labels = cfg.data.labels
    if not deployed:
        if cfg.data.path is None:
            raise ConfigError("data.path: a simulation needs the examples it splits among sites")
        dataset = load_dataset(cfg.data, label_names=labels)
        partition(dataset, cfg.federation.sites, cfg.data)  # ConfigError now, not in round 1
        _check_simulated_groups(cfg)
        labels = dataset.label_names
    eval_set = None
    if cfg.data.eval_path is not None:
        eval_set = load_dataset(
            cfg.data, cfg.data.eval_path, label_names=labels, split=cfg.data.eval_split
        )
        labels = eval_set.label_names
    if cfg.model.task == "classification" and not labels:
        raise ConfigError(
            "a deployed classification run needs data.labels (the label names in id order, "
            "identical at every site) or data.eval-path (their sorted distinct labels)"
        )
    return labels, eval_set


def _check_simulated_groups(cfg: RunConfig) -> None:
    """Simulation's sites are site-0 ... site-<N-1>: a group naming another is a typo."""
    sites = {f"site-{i}" for i in range(cfg.federation.sites)}
    for group, members in sorted(cfg.groups.items()):
        unknown = sorted(set(members) - sites)
        if unknown:
            raise ConfigError(
                f"groups.{group}: {unknown} are not sites of this simulation (site-0 ... "
                f"site-{cfg.federation.sites - 1})"
            )


@dataclass(frozen=True)
class RunInputs:
    """What a coordinator reads before it writes anything: labels, eval set, base + adapter."""

    labels: list[str] | None
    eval_set: Dataset | None
    host: AdapterHost
    # federation.init-from: where the modules' version 0 comes from (server/init_from.py).
    init_from: dict[str, InitSource] = field(default_factory=dict)


def load_inputs(cfg: RunConfig, deployed: bool = False) -> RunInputs:
    """Check the data before any model loads, then load the base and the adapter.

    Writes nothing to the run folder, so that a data or model error leaves it as it was.
    ``deployed``: the sites hold the data, ``data.path`` is not read (see ``run_labels``).
    """
    labels, eval_set = run_labels(cfg, deployed)
    check_backend(cfg.tracking)  # tracking.backend = 'mlflow' without mlflow: say so now
    init_from = read_init_sources(cfg)  # a bad federation.init-from fails before the model loads
    sent = {name: m for name, m in cfg.modules.items() if m.scope != PRIVATE}
    host = AdapterHost(cfg.model, sent, len(labels) if labels else None)
    check_init_sources(init_from, host.base.fingerprint, host.initial)
    return RunInputs(labels=labels, eval_set=eval_set, host=host, init_from=init_from)


def prepare(
    cfg: RunConfig,
    out_dir: Path,
    sealing: Sealing | None = None,
    *,
    deployed: bool = False,
    inputs: RunInputs | None = None,
) -> Coordinator:
    """The coordinator of a run: ``inputs`` (loaded here when None), ``config.json`` written,
    the registry and the audit log opened."""
    if inputs is None:
        inputs = load_inputs(cfg, deployed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "config.json", config_to_dict(cfg))  # the latest start's
    config_json = config_to_dict(cfg)
    return Coordinator(
        cfg=cfg,
        out_dir=out_dir,
        host=inputs.host,
        labels=inputs.labels,
        eval_set=inputs.eval_set,
        registry=Registry(out_dir / "registry"),
        run_id=uuid.uuid4().hex,
        config_digest=config_digest(config_json),
        audit=_open_audit(out_dir, sealing),
        sealing=sealing,
        init_from=inputs.init_from,
    )


def _open_audit(out_dir: Path, sealing: Sealing | None) -> AuditLog:
    """The run's audit log, MACed under the coordinator's key where there is one (not in
    privacy mode ``none``, which has no key)."""
    key = None if sealing is None else audit_mac_key(sealing.coordinator.secret_bytes())
    audit = AuditLog(out_dir / AUDIT_FILE, key)
    if audit.torn:  # only a crash mid-append tears the last line; keep it aside, go on
        moved = audit.repair()
        logger.warning("audit log had a torn last line (crash); moved it to %s", moved)
    return audit


def _global_eval(coord: Coordinator, state: AdapterState) -> dict[str, float]:
    """Evaluate the shared modules on the optional global eval file (coordinator side).

    Group and private modules belong to some sites only; the global figure is the base with
    the modules every site shares.
    """
    shared = [name for name, m in coord.host.modules.items() if m.scope == SHARED]
    if coord.eval_set is None or not shared:
        return {}
    coord.host.load(split_modules(state), active=shared)
    examples = coord.eval_examples
    items = encode_examples(
        examples, coord.eval_set.kind, coord.host.base.tokenizer, coord.cfg.train.max_length
    )
    result = evaluate_encoded(coord.host.model, items, coord.host.task, coord.host.pad_token_id)
    out = {"global_eval_loss": result.loss, "global_eval_perplexity": result.perplexity}
    if result.accuracy is not None:
        out["global_eval_accuracy"] = result.accuracy
    return out


def _publish(
    coord: Coordinator,
    state: AdapterState,
    server_round: int,
    cohort: list[str],
    examples: dict[str, int],
    epsilon: float | None,
    version: int,
) -> int:
    """Publish every sent module as ``version`` (one number for all); return it.

    A module already at ``version`` is skipped: a crash part-way through publishing leaves
    some modules published, and resume publishes the others.
    """
    for module, module_state in split_modules(state).items():
        latest = coord.registry.latest(module)
        if latest is not None and latest.version >= version:
            continue
        members = module_members(coord.cfg.modules[module], coord.cfg.groups, cohort)
        published = _publish_module(
            coord, module, module_state, server_round, members, examples, epsilon
        )
        if published != version:
            raise CheckpointError(
                f"registry: {module} was published as v{published:04d}, expected v{version:04d}"
            )
    return version


def _publish_module(
    coord: Coordinator,
    module: str,
    state: AdapterState,
    server_round: int,
    cohort: list[str],
    examples: dict[str, int],
    epsilon: float | None,
) -> int:
    dp = coord.cfg.privacy.dp
    config = coord.cfg.modules[module]
    version = coord.registry.publish(
        module,
        state,
        coord.host.loras[module],
        {
            "scope": config.scope,
            "round": server_round,
            "run_id": coord.run_id,
            "base_model": coord.cfg.model.name,
            "base_fingerprint": coord.host.base.fingerprint,
            # For the model card: licences where known (an alias's, the base's own card's,
            # data.license), so that a published adapter states what it derives from.
            "base_license": model_license(coord.cfg.model.name),
            "data_license": coord.cfg.data.license,
            "rule": coord.cfg.aggregation.rule,
            "privacy": coord.cfg.privacy.mode,
            "privacy_note": "plain deltas: debugging and benchmarks only"
            if coord.cfg.privacy.mode == "none"
            else "",
            "epsilon": epsilon,
            "dp": {"clip": dp.clip, "noise_multiplier": dp.noise_multiplier, "delta": dp.delta}
            if dp.enabled
            else None,
            "cohort": cohort,
            "examples": sum(examples.get(site, 0) for site in cohort),
            "site_ranks": {site: config.for_site(site).rank for site in cohort},
            "labels": coord.labels,
            **_init_lineage(coord, module, server_round),
        },
    )
    coord.audit.append(
        EVENT_VERSION_PUBLISHED,
        module=module,
        version=version.version,
        round=server_round,
        sha256=version.manifest["sha256"][ADAPTER_FILE],
    )
    coord.tracker.log_version(version)
    return version.version


def _init_lineage(coord: Coordinator, module: str, server_round: int) -> dict[str, Any]:
    """Version 0's manifest records the init-from source it copies (``init_from``)."""
    source = coord.init_from.get(module)
    return {"init_from": source.lineage} if server_round == 0 and source is not None else {}


def _sample(
    coord: Coordinator, strategy: FedLoraStrategy, grid: Grid, server_round: int, stage: str
) -> Cohort | None:
    """Draw ``stage``'s cohort (federation.fraction-*) and point the strategy at it; None
    (every node instructed) when the run does not sample."""
    if coord.sampler is None:
        return None
    cohort = coord.sampler.draw(grid, server_round, stage)
    strategy.cohort_nodes, strategy.cohort_sites = cohort.nodes, cohort.sites
    coord.audit.append(
        EVENT_COHORT_SAMPLED,
        round=server_round,
        stage=stage,
        sites=[clip_text(site) for site in cohort.sites],
        available=cohort.available,
    )
    return cohort


def _evaluate_round(
    coord: Coordinator, strategy: FedLoraStrategy, grid: Grid, server_round: int, arrays: Any
) -> tuple[StageLog, dict[str, Any]]:
    start = time.perf_counter()
    sampled: dict[str, Any] = {}
    if coord.cfg.federation.site_evaluates(server_round):
        cohort = _sample(coord, strategy, grid, server_round, STAGE_EVALUATE)
        if cohort is not None:
            sampled = cohort.fields()
        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
            timeout=coord.cfg.federation.round_timeout,
        )
        strategy.aggregate_evaluate(server_round, replies)
    else:  # federation.evaluate-every: this round the sites only train
        strategy.eval_log = StageLog()
    server_metrics = {**sampled, **_global_eval(coord, arrays.to_torch_state_dict())}
    strategy.eval_log.seconds = time.perf_counter() - start
    return strategy.eval_log, server_metrics


def _audit_stage(audit: AuditLog, server_round: int, stage: str, log: StageLog) -> None:
    for site, metrics in sorted(log.accepted.items()):
        examples = int(metrics.get(P.METRIC_EXAMPLES, 0))
        audit.append(
            EVENT_REPLY_ACCEPTED,
            round=server_round,
            stage=stage,
            site=clip_text(site),
            examples=examples,
        )
    for rejected in log.rejected:
        audit.append(
            EVENT_REPLY_REJECTED,
            round=server_round,
            stage=stage,
            site=clip_text(rejected["site"]),
            reason=clip_text(rejected["reason"]),
        )


def _evaluate_and_record(
    coord: Coordinator,
    strategy: FedLoraStrategy,
    grid: Grid,
    server_round: int,
    arrays: ArrayRecord,
    train_log: StageLog,
    started: float,
    cohort: Cohort | None = None,
) -> None:
    eval_log, server_metrics = _evaluate_round(coord, strategy, grid, server_round, arrays)
    _audit_stage(coord.audit, server_round, "evaluate", eval_log)
    server_metrics.update(train_log.extra)
    if cohort is not None:  # the training cohort; the evaluate one is in already
        server_metrics.update(cohort.fields())
    if strategy.aggregator.accountant is not None:
        server_metrics["epsilon"] = strategy.aggregator.accountant.epsilon()
        server_metrics["dp_delta"] = coord.cfg.privacy.dp.delta
    server_metrics["seconds"] = time.perf_counter() - started
    line = record_round(
        coord.out_dir,
        server_round,
        strategy.version,
        train_log,
        eval_log,
        server_metrics,
        coord.tracker,
    )
    report_round(line)
    coord.audit.append(EVENT_ROUND_COMPLETED, round=server_round, version=strategy.version)


def _checkpoint_and_publish(
    coord: Coordinator, strategy: FedLoraStrategy, server_round: int, arrays: ArrayRecord
) -> None:
    """Checkpoint first, then publish: a crash in between is finished on resume."""
    log = strategy.train_log
    cohort = sorted(log.accepted)
    examples = {site: int(m.get(P.METRIC_EXAMPLES, 0)) for site, m in log.accepted.items()}
    state = arrays.to_torch_state_dict()
    version = 0 if server_round == 0 else strategy.version + 1
    modules = split_modules(state)
    save_checkpoint(
        coord.out_dir,
        Checkpoint(
            round=server_round,
            run_id=coord.run_id,
            config_digest=coord.config_digest,
            versions={module: version for module in modules},
            global_state=modules,
            optimizer_tensors=strategy.aggregator.state_tensors(),
            extra={
                "lineage": {"cohort": cohort, "examples": examples},
                "aggregator": strategy.aggregator.state_meta(),
            },
        ),
    )
    epsilon = strategy.aggregator.epsilon
    strategy.version = _publish(coord, state, server_round, cohort, examples, epsilon, version)


@contextmanager
def _stop_if_unwritable(coord: Coordinator, server_round: int) -> Iterator[None]:
    """A checkpoint or version that cannot be written (disk full) stops the run, on record.

    Both are written to a temp name and renamed, so nothing half-written is visible, and the
    checkpoint on disk is the last one written whole: ``--resume`` continues from it.
    """
    try:
        yield
    except OSError as exc:
        try:
            ckpt = load_checkpoint(coord.out_dir)
            kept = "no checkpoint" if ckpt is None else f"the checkpoint holds round {ckpt.round}"
        except CheckpointError as unreadable:
            kept = str(unreadable)
        reason = (
            f"round {server_round}: writing its checkpoint or version failed ({exc}); nothing "
            f"half-written is visible and {kept}: make room, then rerun with --resume"
        )
        print_message(f"[red]run stopped[/]: {reason}")
        try:
            coord.audit.append(EVENT_RUN_STOPPED, round=server_round, reason=clip_text(reason))
        except OSError as audit_exc:  # the same full disk
            logger.error("the audit log cannot record the stop either: %s", audit_exc)
        raise StorageError(reason) from exc


def _start_fresh(
    coord: Coordinator, strategy: FedLoraStrategy, grid: Grid
) -> tuple[int, ArrayRecord]:
    states = coord.host.states()
    # federation.init-from: version 0 is the source version's tensors, bit for bit.
    states.update({module: source.state for module, source in coord.init_from.items()})
    arrays = ArrayRecord(join_modules(states))
    started = time.perf_counter()
    with _stop_if_unwritable(coord, 0):
        _checkpoint_and_publish(coord, strategy, 0, arrays)
    _evaluate_and_record(coord, strategy, grid, 0, arrays, StageLog(), started)
    return 1, arrays


def _resume(
    coord: Coordinator, strategy: FedLoraStrategy, grid: Grid, ckpt: Checkpoint
) -> tuple[int, ArrayRecord]:
    """Continue after the checkpointed round; finish what a crash interrupted."""
    if ckpt.config_digest != coord.config_digest:
        raise CheckpointError(
            f"{coord.out_dir}: the checkpoint was made with a different configuration; "
            "resume with the same config (and --set values) or start a new run"
        )
    coord.run_id = strategy.run_id = ckpt.run_id
    coord.audit.append(EVENT_RUN_RESUMED, run_id=ckpt.run_id, after_round=ckpt.round)
    strategy.aggregator.load_state(ckpt.optimizer_tensors, ckpt.extra["aggregator"])
    state = join_modules(ckpt.global_state)
    arrays = ArrayRecord(state)
    version = max(ckpt.versions.values())
    latest = [coord.registry.latest(module) for module in ckpt.global_state]
    if any(v is None or v.version < version for v in latest):  # crash before publishing all
        lineage = ckpt.extra["lineage"]
        cohort, examples = list(lineage["cohort"]), dict(lineage["examples"])
        epsilon = strategy.aggregator.epsilon
        with _stop_if_unwritable(coord, ckpt.round):
            _publish(coord, state, ckpt.round, cohort, examples, epsilon, version)
    for entry in latest:
        if entry is not None and entry.version > version:
            raise CheckpointError(
                f"registry holds {entry.name} but the checkpoint only v{version:04d}"
            )
        if entry is not None and entry.version == version:
            _audit_recovered_publish(coord, entry)
    strategy.version = version
    history = truncate_metrics(coord.out_dir, ckpt.round)
    print_message(f"resuming run {coord.run_id[:8]} after round {ckpt.round} (v{version:04d})")
    if not history or history[-1]["round"] < ckpt.round:  # its evaluation was interrupted
        _evaluate_and_record(
            coord, strategy, grid, ckpt.round, arrays, StageLog(), time.perf_counter()
        )
    return ckpt.round + 1, arrays


def _audit_recovered_publish(coord: Coordinator, latest: RegistryVersion) -> None:
    """A crash between publishing a version and logging it leaves it unlogged: log it now."""
    logged = {
        (e.get("module"), e.get("version"))
        for e in read_entries(coord.audit.path)
        if e.get("event") == EVENT_VERSION_PUBLISHED
    }
    if (latest.module, latest.version) not in logged:
        coord.audit.append(
            EVENT_VERSION_PUBLISHED,
            module=latest.module,
            version=latest.version,
            round=latest.manifest["round"],
            sha256=latest.manifest["sha256"][ADAPTER_FILE],
            recovered=True,
        )


def _train_stage(
    strategy: FedLoraStrategy, grid: Grid, server_round: int, arrays: ArrayRecord
) -> ArrayRecord:
    """Train instructions out, replies validated and aggregated: the new global adapter."""
    cfg = strategy.cfg
    if cfg.privacy.mode == "secure-sum":
        secure = SecureSumRound(strategy, grid, server_round)
        strategy.train_log = secure.log  # filled as the stages go, also if one fails
        new_arrays: ArrayRecord | None = secure.run(arrays)
    else:
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid),
            timeout=cfg.federation.round_timeout,
        )
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
    if new_arrays is None:
        raise AggregationError(f"round {server_round}: nothing to aggregate")
    # The next version is what sites rebuild from its encoded step (federation.downlink).
    published = strategy.downlink.publish(
        strategy.version + 1, arrays.to_torch_state_dict(), new_arrays.to_torch_state_dict()
    )
    return ArrayRecord(published)


def _record_failed_round(
    coord: Coordinator,
    strategy: FedLoraStrategy,
    server_round: int,
    reason: str,
    t0: float,
    cohort: Cohort | None,
) -> None:
    """A round that cannot aggregate publishes nothing; the previous version stays global."""
    print_message(f"[red]round {server_round} failed[/]: {reason}; v{strategy.version:04d} stays")
    _audit_stage(coord.audit, server_round, "train", strategy.train_log)
    coord.audit.append(EVENT_ROUND_FAILED, round=server_round, reason=clip_text(reason))
    extra: dict[str, Any] = {"failed": reason, "seconds": time.perf_counter() - t0}
    if cohort is not None:
        extra.update(cohort.fields())
    record_round(
        coord.out_dir,
        server_round,
        strategy.version,
        strategy.train_log,
        StageLog(),
        extra,
        coord.tracker,
    )


def run_federation(grid: Grid, coord: Coordinator, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) every round of ``coord.cfg``; return the summary (also on disk).

    Rounds and versions are mirrored to ``coord.tracker`` (``tracking``): a resumed run
    continues the tracker's run, and the tracker learns how the run ended.
    """
    coord.tracker = open_tracker(coord.cfg, coord.out_dir, resume, coord.run_id)
    try:
        summary = _run_rounds(grid, coord, resume)
    except KeyboardInterrupt:
        coord.tracker.finish("KILLED")
        raise
    except BaseException:
        coord.tracker.finish("FAILED")
        raise
    coord.tracker.finish("FINISHED", coord.out_dir / "summary.json")
    return summary


def _run_rounds(grid: Grid, coord: Coordinator, resume: bool) -> dict[str, Any]:
    cfg, started = coord.cfg, time.perf_counter()
    clock = RoundClock(cfg.federation.rounds)
    strategy = FedLoraStrategy(
        cfg, site_plan(cfg, coord.labels), coord.host.base.fingerprint, coord.run_id, coord.sealing
    )
    fed = cfg.federation
    strategy.node_ids = wait_for_nodes(grid, fed.available_floor, fed.round_timeout)
    for node in strategy.node_ids:
        coord.audit.append(EVENT_SITE_SEEN, node_id=int(node))
    coord.sampler = CohortSampler(strategy) if fed.samples else None
    state = join_modules(coord.host.states())
    sampling = (
        f", sampling {fed.fraction_train:g} to train, {fed.fraction_evaluate:g} to evaluate"
        if fed.samples
        else ""
    )
    print_rule(f"fedlora run {coord.run_id[:8]}: {fed.sites} sites{sampling}")
    print_message(
        f"base {cfg.model.name} fingerprint {coord.host.base.fingerprint[:16]}…, "
        f"adapter {num_parameters(state):,} params, {state_num_bytes(state):,} bytes fp32"
    )
    ckpt = load_checkpoint(coord.out_dir) if resume else None
    if ckpt is None:
        coord.audit.append(
            EVENT_RUN_STARTED,
            run_id=coord.run_id,
            base_model=cfg.model.name,
            base_fingerprint=coord.host.base.fingerprint,
            rule=cfg.aggregation.rule,
            privacy=cfg.privacy.mode,
            sites=cfg.federation.sites,
            rounds=cfg.federation.rounds,
        )
        first_round, arrays = _start_fresh(coord, strategy, grid)
    else:
        first_round, arrays = _resume(coord, strategy, grid, ckpt)
    clock.round_done(first_round - 1, None)  # round 0, or the checkpoint's round
    stopped: str | None = None
    for server_round in range(first_round, cfg.federation.rounds + 1):
        try:
            strategy.aggregator.check_budget()
        except PrivacyBudgetExceeded as exc:
            stopped = str(exc)
            print_message(f"[yellow]stopping before round {server_round}[/]: {exc}")
            coord.audit.append(
                EVENT_RUN_STOPPED, before_round=server_round, reason=clip_text(stopped)
            )
            break
        t0 = time.perf_counter()
        cohort = _sample(coord, strategy, grid, server_round, STAGE_TRAIN)
        coord.audit.append(
            EVENT_ROUND_STARTED, round=server_round, cohort_size=len(strategy.instructed)
        )
        try:
            arrays = _train_stage(strategy, grid, server_round, arrays)
        except (AggregationError, SecAggError) as exc:
            _record_failed_round(coord, strategy, server_round, str(exc), t0, cohort)
            clock.round_done(server_round, time.perf_counter() - t0)
            continue
        strategy.train_log.seconds = time.perf_counter() - t0
        _audit_stage(coord.audit, server_round, "train", strategy.train_log)
        with _stop_if_unwritable(coord, server_round):
            _checkpoint_and_publish(coord, strategy, server_round, arrays)
        _evaluate_and_record(
            coord, strategy, grid, server_round, arrays, strategy.train_log, t0, cohort
        )
        clock.round_done(server_round, time.perf_counter() - t0)
    facts = _facts(coord, time.perf_counter() - started)
    facts["stopped"] = stopped
    facts["epsilon"] = strategy.aggregator.epsilon
    summary = run_summary(read_metrics(coord.out_dir), facts)
    write_json_atomic(coord.out_dir / "summary.json", summary)
    return summary


def _facts(coord: Coordinator, seconds: float) -> dict[str, Any]:
    frozen = [p for p in coord.host.model.parameters() if not p.requires_grad]
    main = "shared" if "shared" in coord.host.modules else next(iter(coord.host.modules))
    latest = coord.registry.latest(main)
    assert latest is not None  # published before any round ran
    adapters = {m: coord.registry.latest(m) for m in coord.host.modules}
    return {
        "run_id": coord.run_id,
        "sites": coord.cfg.federation.sites,
        "base_model": coord.cfg.model.name,
        "base_fingerprint": coord.host.base.fingerprint,
        "adapter_dir": str(latest.path),
        "adapter_dirs": {m: str(v.path) for m, v in adapters.items() if v is not None},
        "base_parameters": sum(p.numel() for p in frozen),
        "base_bytes": sum(p.numel() * p.element_size() for p in frozen),
        "adapter_parameters": sum(
            num_parameters(coord.registry.load(m, v.version))
            for m, v in adapters.items()
            if v is not None
        ),
        "coordinator_peak_memory_bytes": peak_memory_bytes(coord.host.base.placement.device),
        "seconds": seconds,
    }
