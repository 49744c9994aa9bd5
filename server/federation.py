"""The coordinator's round loop: instruct, aggregate, publish a version, evaluate, record.

Round 0 evaluates the initial adapter (LoRA B = 0, so it *is* the base model) so that every
later round can be compared with the untouched base.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from client.data import Dataset, load_dataset, partition
from client.site import EVAL_BATCH_SIZE, AdapterHost
from client.tokens import encode_examples, eval_batches
from client.train import adapter_state, evaluate, load_adapter_state
from common import protocol as P
from common.adapters import AdapterState, AggregationError, num_parameters, state_num_bytes
from common.atomic import append_jsonl, write_json_atomic
from common.config import RunConfig, config_to_dict, site_plan
from common.models import peak_memory_bytes
from common.progress import print_message, print_rule, print_table
from server.registry import Registry
from server.strategy import FedLoraStrategy, StageLog, wait_for_nodes

logger = logging.getLogger(__name__)


@dataclass
class Coordinator:
    """What the coordinator holds for a run: its base model + adapter, data facts, outputs."""

    cfg: RunConfig
    out_dir: Path
    host: AdapterHost
    dataset: Dataset
    eval_set: Dataset | None
    registry: Registry
    run_id: str


def prepare(cfg: RunConfig, out_dir: Path) -> Coordinator:
    """Check the data split before any model loads, then load the base and the adapter."""
    dataset = load_dataset(cfg.data)
    partition(dataset, cfg.federation.sites, cfg.data)  # ConfigError now, not in round 1
    eval_set = None
    if cfg.data.eval_path is not None:
        eval_set = load_dataset(cfg.data, cfg.data.eval_path, label_names=dataset.label_names)
    labels = dataset.label_names
    host = AdapterHost(cfg.model, cfg.modules["shared"], len(labels) if labels else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "config.json", config_to_dict(cfg))
    return Coordinator(
        cfg, out_dir, host, dataset, eval_set, Registry(out_dir / "registry"), uuid.uuid4().hex
    )


def _global_eval(coord: Coordinator, state: AdapterState) -> dict[str, float]:
    """Evaluate the global adapter on the optional global eval file (coordinator side)."""
    if coord.eval_set is None:
        return {}
    load_adapter_state(coord.host.model, state)
    examples = coord.eval_set.examples[: coord.cfg.data.max_eval_examples]
    items = encode_examples(
        examples, coord.eval_set.kind, coord.host.base.tokenizer, coord.cfg.train.max_length
    )
    pad = coord.host.pad_token_id
    result = evaluate(coord.host.model, eval_batches(items, EVAL_BATCH_SIZE, pad), coord.host.task)
    out = {"global_eval_loss": result.loss, "global_eval_perplexity": result.perplexity}
    if result.accuracy is not None:
        out["global_eval_accuracy"] = result.accuracy
    return out


def _publish(
    coord: Coordinator, state: AdapterState, server_round: int, cohort: list[str], examples: int
) -> int:
    version = coord.registry.publish(
        "shared",
        state,
        coord.host.lora,
        {
            "round": server_round,
            "run_id": coord.run_id,
            "base_model": coord.cfg.model.name,
            "base_fingerprint": coord.host.base.fingerprint,
            "rule": coord.cfg.aggregation.rule,
            "privacy": coord.cfg.privacy.mode,
            "privacy_note": "plain deltas: debugging and benchmarks only"
            if coord.cfg.privacy.mode == "none"
            else "",
            "epsilon": None,
            "cohort": cohort,
            "examples": examples,
        },
    )
    return version.version


def _record(
    coord: Coordinator,
    server_round: int,
    version: int,
    train: StageLog,
    evaluation: StageLog,
    extra: dict[str, Any],
) -> dict[str, Any]:
    def weighted(log: StageLog, key: str, weight: str) -> float | None:
        pairs = [(m[key], m.get(weight, 0.0)) for m in log.accepted.values() if key in m]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total > 0 else None

    eval_loss = weighted(evaluation, P.METRIC_EVAL_LOSS, P.METRIC_EVAL_TOKENS)
    # Per site, per stage: {"site-0": {"train": {...}, "evaluate": {...}}}
    sites: dict[str, dict[str, dict[str, float]]] = {}
    for stage, log in (("train", train), ("evaluate", evaluation)):
        for site, metrics in sorted(log.accepted.items()):
            sites.setdefault(site, {})[stage] = {k.replace("-", "_"): v for k, v in metrics.items()}
    peaks = [m.get(P.METRIC_PEAK_MEMORY, 0.0) for m in train.accepted.values()]
    line = {
        "round": server_round,
        "version": version,
        "train_loss": weighted(train, P.METRIC_TRAIN_LOSS, P.METRIC_EXAMPLES),
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(min(eval_loss, 50.0)) if eval_loss is not None else None,
        "eval_accuracy": weighted(evaluation, P.METRIC_EVAL_ACCURACY, P.METRIC_EXAMPLES),
        "bytes_up": train.bytes_up,
        "bytes_down": train.bytes_down + evaluation.bytes_down,
        "seconds_train": train.seconds,
        "seconds_eval": evaluation.seconds,
        "peak_memory_bytes": int(max(peaks)) if peaks else None,
        "cohort": sorted(train.accepted),
        "rejected": train.rejected + evaluation.rejected,
        "sites": sites,
        **extra,
    }
    append_jsonl(coord.out_dir / "metrics.jsonl", line)
    return line


def _evaluate_round(
    coord: Coordinator, strategy: FedLoraStrategy, grid: Grid, server_round: int, arrays: Any
) -> tuple[StageLog, dict[str, float]]:
    start = time.perf_counter()
    replies = grid.send_and_receive(
        strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
        timeout=coord.cfg.federation.round_timeout,
    )
    strategy.aggregate_evaluate(server_round, replies)
    server_metrics = _global_eval(coord, arrays.to_torch_state_dict())
    strategy.eval_log.seconds = time.perf_counter() - start
    return strategy.eval_log, server_metrics


def run_federation(grid: Grid, coord: Coordinator) -> dict[str, Any]:
    """Run every round of ``coord.cfg``; return the run summary (also written to disk)."""
    cfg, started = coord.cfg, time.perf_counter()
    strategy = FedLoraStrategy(cfg, site_plan(cfg), coord.host.base.fingerprint, coord.run_id)
    strategy.node_ids = wait_for_nodes(grid, cfg.federation.sites, cfg.federation.round_timeout)
    state = adapter_state(coord.host.model)
    version = _publish(coord, state, 0, [], 0)
    arrays = ArrayRecord(state)
    print_rule(f"fedlora run {coord.run_id[:8]}: {cfg.federation.sites} sites")
    print_message(
        f"base {cfg.model.name} fingerprint {coord.host.base.fingerprint[:16]}…, "
        f"adapter {num_parameters(state):,} params, {state_num_bytes(state):,} bytes fp32"
    )
    t0 = time.perf_counter()
    eval_log, server_metrics = _evaluate_round(coord, strategy, grid, 0, arrays)
    server_metrics["seconds"] = time.perf_counter() - t0
    history = [_report(_record(coord, 0, version, StageLog(), eval_log, server_metrics))]
    for server_round in range(1, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid),
            timeout=cfg.federation.round_timeout,
        )
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        strategy.train_log.seconds = time.perf_counter() - t0
        if new_arrays is None:
            raise AggregationError(f"round {server_round}: nothing to aggregate")
        arrays, train_log = new_arrays, strategy.train_log
        cohort = sorted(train_log.accepted)
        examples = int(sum(m.get(P.METRIC_EXAMPLES, 0) for m in train_log.accepted.values()))
        version = _publish(coord, arrays.to_torch_state_dict(), server_round, cohort, examples)
        strategy.version = version
        eval_log, server_metrics = _evaluate_round(coord, strategy, grid, server_round, arrays)
        server_metrics["seconds"] = time.perf_counter() - t0
        history.append(
            _report(_record(coord, server_round, version, train_log, eval_log, server_metrics))
        )
    summary = _summary(coord, history, time.perf_counter() - started)
    write_json_atomic(coord.out_dir / "summary.json", summary)
    return summary


def _report(line: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for site, stages in line["sites"].items():
        train, evaluation = stages.get("train", {}), stages.get("evaluate", {})
        rows.append(
            [
                site,
                train.get("train_loss"),
                evaluation.get("eval_loss"),
                evaluation.get("eval_accuracy"),
                train.get("num_examples"),
                train.get("seconds"),
            ]
        )
    print_table(
        f"round {line['round']} → v{line['version']:04d}: train loss {_fmt(line['train_loss'])}, "
        f"eval loss {_fmt(line['eval_loss'])}, ppl {_fmt(line['eval_perplexity'])}, "
        f"up {line['bytes_up']:,} B, down {line['bytes_down']:,} B, "
        f"rejected {len(line['rejected'])}",
        ["site", "train loss", "eval loss", "eval acc", "train examples", "train s"],
        rows,
    )
    return line


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _summary(coord: Coordinator, history: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    first, last = history[0], history[-1]
    frozen = [p for p in coord.host.model.parameters() if not p.requires_grad]
    return {
        "run_id": coord.run_id,
        "rounds": len(history) - 1,
        "sites": coord.cfg.federation.sites,
        "base_model": coord.cfg.model.name,
        "base_fingerprint": coord.host.base.fingerprint,
        "final_version": last["version"],
        "adapter_dir": str(coord.registry.module_dir("shared") / f"v{last['version']:04d}"),
        "initial_eval_loss": first["eval_loss"],
        "final_eval_loss": last["eval_loss"],
        "initial_eval_accuracy": first["eval_accuracy"],
        "final_eval_accuracy": last["eval_accuracy"],
        "base_parameters": sum(p.numel() for p in frozen),
        "base_bytes": sum(p.numel() * p.element_size() for p in frozen),
        "adapter_parameters": num_parameters(coord.registry.load("shared", last["version"])),
        "coordinator_peak_memory_bytes": peak_memory_bytes(coord.host.base.placement.device),
        "peak_site_memory_bytes": max((h["peak_memory_bytes"] or 0) for h in history),
        "bytes_up_total": sum(h["bytes_up"] for h in history),
        "bytes_down_total": sum(h["bytes_down"] for h in history),
        "rejected_total": sum(len(h["rejected"]) for h in history),
        "seconds": seconds,
    }
