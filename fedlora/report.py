"""``fedlora report RUN_DIR``: plots of a finished (or running) federation and a Markdown report.

Reads what the coordinator wrote into the run folder and nothing else: ``metrics.jsonl`` (one
line per round), ``summary.json``, ``config.json``, ``registry/<module>/vNNNN/manifest.json``
and ``audit.jsonl``. Writes into ``RUN_DIR/report`` (or ``--out``):

``loss.png``
    Held-out loss per site and round, local training loss per site, and the global figures:
    the token-weighted mean of the sites' held-out losses (``eval_loss``), the
    example-weighted training loss and, when the config has a global eval file, the
    coordinator's own ``global_eval_loss``.
``accuracy.png``
    The same for accuracy (classification runs only; absent otherwise).
``bytes.png``
    Bytes up (deltas) and down (global adapter) per round, all sites together.
``seconds.png``
    Wall seconds of the train and evaluate phases per round.
``report.md``
    The plots, a per-round table, the run's config, the registry lineage and every rejected
    reply.

The series and their drawing live in ``fedlora.run_plots``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import FedloraError
from common.registry import Registry
from common.registry_format import ADAPTER_FILE, MANIFEST_FILE
from fedlora.run_plots import Series, draw_plots, finite_number
from server.audit import AUDIT_FILE, EVENT_REPLY_REJECTED, read_entries
from server.metrics import METRICS_FILE, read_metrics

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
REGISTRY_DIR = "registry"
REPORT_DIR = "report"
REPORT_FILE = "report.md"
# Characters of a rejection reason shown in the table; the full text stays in audit.jsonl.
_MAX_REASON_CHARS = 200


class ReportError(FedloraError):
    """The run folder is missing or holds no metrics to report on."""


@dataclass
class RunRecords:
    """Everything the report reads from one run folder."""

    run_dir: Path
    rounds: list[dict[str, Any]]
    config: dict[str, Any] | None
    summary: dict[str, Any] | None
    lineage: list[dict[str, Any]]
    rejected: list[dict[str, Any]]


@dataclass
class Report:
    """What ``write_report`` produced: the files and the series drawn in each plot."""

    markdown: Path
    plots: dict[str, Path]
    series: dict[str, Series] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or ``None`` if it does not exist."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc})") from exc
    return value if isinstance(value, dict) else None


def read_lineage(run_dir: Path) -> list[dict[str, Any]]:
    """One row per published version of every module, from its ``manifest.json``."""
    registry = Registry(run_dir / REGISTRY_DIR)
    rows: list[dict[str, Any]] = []
    for module in registry.modules():
        for entry in registry.versions(module):
            manifest = _read_json(entry.path / MANIFEST_FILE) or {}
            digests = manifest.get("sha256")
            digest = digests.get(ADAPTER_FILE) if isinstance(digests, dict) else None
            rows.append(
                {
                    "module": module,
                    "version": entry.version,
                    "parent": manifest.get("parent"),
                    "round": manifest.get("round"),
                    "cohort": list(manifest.get("cohort") or []),
                    "examples": manifest.get("examples"),
                    "rule": manifest.get("rule"),
                    "sha256": digest[:12] if isinstance(digest, str) else None,
                }
            )
    return rows


def read_rejections(run_dir: Path, rounds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rejected replies from ``audit.jsonl`` plus any in ``metrics.jsonl`` the audit lacks.

    The audit entry carries the stage; the metrics line only site and reason. An entry in
    both is listed once (source ``audit``).
    """
    found: list[dict[str, Any]] = []
    audit = run_dir / AUDIT_FILE
    if audit.is_file():
        for entry in read_entries(audit):
            if entry.get("event") == EVENT_REPLY_REJECTED:
                found.append({**_rejection(entry, entry.get("round")), "source": "audit"})
    seen = {(r["round"], r["site"], r["reason"]) for r in found}
    for line in rounds:
        for item in line.get("rejected") or []:
            row = _rejection(item, line.get("round"))
            if (row["round"], row["site"], row["reason"]) not in seen:
                found.append({**row, "source": "metrics"})
    return sorted(found, key=lambda r: r["round"] if isinstance(r["round"], int) else -1)


def _rejection(item: dict[str, Any], server_round: Any) -> dict[str, Any]:
    return {
        "round": server_round,
        "stage": item.get("stage"),
        "site": str(item.get("site")),
        "reason": str(item.get("reason")),
    }


def load_run(run_dir: Path) -> RunRecords:
    """Read a run folder; ``ReportError`` if it has no ``metrics.jsonl`` lines."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {run_dir} does not exist")
    try:
        rounds = read_metrics(run_dir)
    except ValueError as exc:
        raise ReportError(
            f"{run_dir / METRICS_FILE} holds a line that is not JSON ({exc})"
        ) from exc
    if not rounds:
        raise ReportError(
            f"{run_dir} has no {METRICS_FILE} lines: not a fedlora run folder, or no round "
            "has finished yet"
        )
    if not all(isinstance(line, dict) and isinstance(line.get("round"), int) for line in rounds):
        raise ReportError(f"{run_dir / METRICS_FILE}: every line needs an integer 'round'")
    return RunRecords(
        run_dir=run_dir,
        rounds=sorted(rounds, key=lambda line: int(line["round"])),
        config=_read_json(run_dir / CONFIG_FILE),
        summary=_read_json(run_dir / SUMMARY_FILE),
        lineage=read_lineage(run_dir),
        rejected=read_rejections(run_dir, rounds),
    )


# ---------------------------------------------------------------------------- markdown


def _cell(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for missing, fixed digits for floats, separators for ints."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _summary_section(records: RunRecords) -> list[str]:
    summary = records.summary or {}
    first, last = records.rounds[0], records.rounds[-1]
    rows = [
        ("base model", summary.get("base_model")),
        ("sites / rounds", f"{summary.get('sites', '-')} / {last.get('round')}"),
        ("held-out loss, round 0 → last", f"{_cell(first.get('eval_loss'))} → "
         f"{_cell(last.get('eval_loss'))}"),
        ("held-out accuracy, round 0 → last", f"{_cell(first.get('eval_accuracy'))} → "
         f"{_cell(last.get('eval_accuracy'))}"),
        ("bytes up / down, whole run", f"{_cell(summary.get('bytes_up_total'))} / "
         f"{_cell(summary.get('bytes_down_total'))}"),
        ("adapter parameters", summary.get("adapter_parameters")),
        ("federation seconds", _cell(finite_number(summary.get("seconds")), digits=1)),
        ("rejected replies", len(records.rejected)),
    ]  # fmt: skip
    return ["## Summary", "", *_table(["figure", "value"], rows), ""]


def _rounds_section(records: RunRecords) -> list[str]:
    header = ["round", "version", "train loss", "eval loss", "eval ppl", "eval acc",
              "bytes up", "bytes down", "s train", "s eval", "cohort", "rejected"]  # fmt: skip
    rows = [
        [line.get("round"), line.get("version"), line.get("train_loss"), line.get("eval_loss"),
         line.get("eval_perplexity"), line.get("eval_accuracy"), line.get("bytes_up"),
         line.get("bytes_down"), line.get("seconds_train"), line.get("seconds_eval"),
         len(line.get("cohort") or []), len(line.get("rejected") or [])]
        for line in records.rounds
    ]  # fmt: skip
    return ["## Rounds", "", *_table(header, rows), ""]


def _plots_section(plots: dict[str, Path], out_dir: Path) -> list[str]:
    titles = {"loss": "Loss", "accuracy": "Accuracy", "bytes": "Bytes per round",
              "seconds": "Seconds per phase"}  # fmt: skip
    lines: list[str] = []
    for name, title in titles.items():
        lines += [f"## {title}", ""]
        if name in plots:
            lines.append(f"![{title}]({plots[name].relative_to(out_dir).as_posix()})")
        else:
            lines.append(f"No {name} recorded in this run (accuracy is for classification).")
        lines.append("")
    return lines


def _lineage_section(records: RunRecords) -> list[str]:
    header = ["module", "version", "parent", "round", "rule", "cohort", "examples", "sha256"]
    rows = [
        [r["module"], r["version"], r["parent"], r["round"], r["rule"],
         ", ".join(r["cohort"]) or "-", r["examples"], r["sha256"]]
        for r in records.lineage
    ]  # fmt: skip
    body = _table(header, rows) if rows else ["No registry versions found."]
    return ["## Lineage (registry)", "", *body, ""]


def _rejected_section(records: RunRecords) -> list[str]:
    if not records.rejected:
        return ["## Rejected replies", "", "None.", ""]
    rows = [
        [r["round"], r["stage"], r["site"], r["reason"][:_MAX_REASON_CHARS], r["source"]]
        for r in records.rejected
    ]
    return [
        "## Rejected replies",
        "",
        *_table(["round", "stage", "site", "reason", "source"], rows),
        "",
    ]


def _config_section(records: RunRecords) -> list[str]:
    if records.config is None:
        return ["## Configuration", "", f"No {CONFIG_FILE} in the run folder.", ""]
    text = json.dumps(records.config, indent=2, sort_keys=True)
    return ["## Configuration", "", f"`{CONFIG_FILE}`:", "", "```json", text, "```", ""]


def render_markdown(records: RunRecords, plots: dict[str, Path], out_dir: Path) -> str:
    """The whole ``report.md`` text; image links are relative to ``out_dir``."""
    lines = [f"# Run report: {records.run_dir.name}", "", f"Run folder: `{records.run_dir}`", ""]
    lines += _summary_section(records)
    lines += _plots_section(plots, out_dir)
    lines += _rounds_section(records)
    lines += _lineage_section(records)
    lines += _rejected_section(records)
    lines += _config_section(records)
    return "\n".join(lines)


def write_report(run_dir: Path, out_dir: Path | None = None) -> Report:
    """Read ``run_dir``, draw the plots and write ``report.md`` into ``out_dir``.

    Parameters
    ----------
    run_dir
        A folder written by ``fedlora simulate`` (``metrics.jsonl`` at least).
    out_dir
        Where the PNGs and ``report.md`` go; default ``run_dir/report`` (created).

    Returns
    -------
    Report
        The paths written and, per plot, the series drawn (name -> (rounds, values)).

    Raises
    ------
    ReportError
        The run folder does not exist or has no metrics.
    """
    records = load_run(Path(run_dir))
    out_dir = Path(out_dir) if out_dir is not None else records.run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    plots, series = draw_plots(records.rounds, out_dir)
    markdown = out_dir / REPORT_FILE
    markdown.write_text(render_markdown(records, plots, out_dir) + "\n", encoding="utf-8")
    return Report(markdown=markdown, plots=plots, series=series)
