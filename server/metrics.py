"""Per-round records: one ``metrics.jsonl`` line, a terminal table, and the run summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common import protocol as P
from common.atomic import append_jsonl, write_bytes_atomic
from common.progress import print_table
from server.strategy import StageLog
from server.tracking import Tracker

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def truncate_metrics(run_dir: Path, last_round: int) -> list[dict[str, Any]]:
    """Drop lines of rounds after ``last_round`` (a redone round writes its line again)."""
    lines = read_metrics(run_dir)
    kept = [line for line in lines if line["round"] <= last_round]
    if len(kept) != len(lines):
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in kept)
        write_bytes_atomic(run_dir / METRICS_FILE, text.encode())
    return kept


def record_round(
    run_dir: Path,
    server_round: int,
    version: int,
    train: StageLog,
    evaluation: StageLog,
    extra: dict[str, Any],
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Append the round's line to ``metrics.jsonl`` (the record), then hand it to ``tracker``
    (a copy: see ``server.tracking``); return it."""

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
    append_jsonl(run_dir / METRICS_FILE, line)
    if tracker is not None:
        tracker.log_round(line)
    return line


def report_round(line: dict[str, Any]) -> dict[str, Any]:
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
        f"rejected {len(line['rejected'])}{_cohort_text(line)}",
        ["site", "train loss", "eval loss", "eval acc", "train examples", "train s"],
        rows,
    )
    return line


def _cohort_text(line: dict[str, Any]) -> str:
    """How many sites a sampling round instructed out of how many were available."""
    if "available_sites" not in line:
        return ""
    available = line["available_sites"]
    parts = [
        f"{len(line[f'sampled_{stage}'])}/{available} sites {verb}"
        for stage, verb in (("train", "trained"), ("evaluate", "evaluated"))
        if f"sampled_{stage}" in line
    ]
    return f", {', '.join(parts)}" if parts else ""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_summary(history: list[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    """The run's summary: ``facts`` from the coordinator plus totals over ``history``."""
    evaluated = [h for h in history if "failed" not in h]
    first, last = evaluated[0], evaluated[-1]
    return {
        **facts,
        "rounds": history[-1]["round"],
        "failed_rounds": [h["round"] for h in history if "failed" in h],
        "final_version": last["version"],
        "initial_eval_loss": first["eval_loss"],
        "final_eval_loss": last["eval_loss"],
        "initial_eval_accuracy": first["eval_accuracy"],
        "final_eval_accuracy": last["eval_accuracy"],
        "peak_site_memory_bytes": max((h["peak_memory_bytes"] or 0) for h in history),
        "bytes_up_total": sum(h["bytes_up"] for h in history),
        "bytes_down_total": sum(h["bytes_down"] for h in history),
        "rejected_total": sum(len(h["rejected"]) for h in history),
    }
