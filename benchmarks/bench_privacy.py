"""Privacy-mode overhead: round time and bytes up for none, sealed and secure-sum, side by side.

For every site count, runs ``fedlora simulate`` (one subprocess per run) once per privacy mode,
interleaved (none, sealed, secure-sum, none, sealed, ... when repeated), on the same quick
configuration of the SmolLM2-135M demo (LoRA r=8 on q_proj, v_proj: 460,800 parameters), then
reads each run's ``metrics.jsonl``. Reported per mode: mean round seconds (rounds >= 1),
train-stage seconds, bytes up per site per round, ratios to ``none``, and the upload against
the fp32 delta (parameters x 4 bytes). Deltas travel as fp32 (``privacy.encoding = 'fp32'``)
in every mode, so the comparison is to the same plain delta.

    python benchmarks/bench_privacy.py [--sites 5 20] [--repeats 1]

Targets (issue 3): sealed <= 1.05x and secure-sum <= 1.25x the round time of none;
secure-sum upload <= 1.1x the fp32 delta size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

from bench_output import header, run_simulate, trained_rounds, write_result

REPO = Path(__file__).resolve().parent.parent
MODES = ("none", "sealed", "secure-sum")
SEALED_TIME_TARGET = 1.05
SECURE_SUM_TIME_TARGET = 1.25
SECURE_SUM_UPLOAD_TARGET = 1.1

# Quick settings: training is a negligible part of the round, so what remains is the cost of
# the protocol (encode, seal/mask, transfer, open/unmask, aggregate) plus Flower's overhead.
QUICK_OVERRIDES = [
    "federation.rounds=2",
    "data.partition='iid'",
    "train.local-steps=1",
    "train.batch-size=1",
    "train.max-length=32",
    "data.max-examples-per-site=8",
    "data.max-eval-examples=2",
    "privacy.encoding='fp32'",
]


def run_figures(out: Path, wall: float) -> dict[str, Any]:
    """Figures of one run from its metrics.jsonl and summary.json."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    _, trained = trained_rounds(out)
    up_per_site = [r["bytes_up"] / len(r["cohort"]) for r in trained if r["cohort"]]
    errors = [r["secure_sum_max_abs_error"] for r in trained if "secure_sum_max_abs_error" in r]
    return {
        "wall_seconds": wall,
        "round_seconds": [r["seconds"] for r in trained],
        "train_seconds": [r["seconds_train"] for r in trained],
        "eval_seconds": [r["seconds_eval"] for r in trained],
        "bytes_up_per_site": up_per_site,
        "cohort_sizes": [len(r["cohort"]) for r in trained],
        "rejected": sum(len(r.get("rejected", [])) for r in trained),
        "adapter_parameters": summary.get("adapter_parameters"),
        "final_eval_loss": summary.get("final_eval_loss"),
        "secure_sum_max_abs_error": max(errors) if errors else None,
    }


def mode_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the repeats of one (sites, mode) cell."""
    return {
        "repeats": len(runs),
        "round_seconds_mean": mean(s for r in runs for s in r["round_seconds"]),
        "train_seconds_mean": mean(s for r in runs for s in r["train_seconds"]),
        "eval_seconds_mean": mean(s for r in runs for s in r["eval_seconds"]),
        "bytes_up_per_site_per_round": mean(b for r in runs for b in r["bytes_up_per_site"]),
        "wall_seconds_mean": mean(r["wall_seconds"] for r in runs),
        "rejected": sum(r["rejected"] for r in runs),
        "secure_sum_max_abs_error": runs[0]["secure_sum_max_abs_error"],
    }


def add_ratios(cells: dict[str, dict[str, Any]], delta_bytes: int) -> None:
    """Ratios to the ``none`` cell of the same site count, and upload / fp32 delta size."""
    base = cells.get("none")
    for cell in cells.values():
        cell["upload_vs_fp32_delta"] = cell["bytes_up_per_site_per_round"] / delta_bytes
        if base is None:
            continue
        for key in (
            "round_seconds_mean",
            "train_seconds_mean",
            "eval_seconds_mean",
            "bytes_up_per_site_per_round",
        ):
            cell[f"{key}_ratio_to_none"] = cell[key] / base[key]


def verdicts(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One line per target and site count: met or missed, with the measured figure."""
    lines = []
    for sites, cells in results.items():
        checks = [
            ("sealed", "round_seconds_mean_ratio_to_none", SEALED_TIME_TARGET, "round time"),
            (
                "secure-sum",
                "round_seconds_mean_ratio_to_none",
                SECURE_SUM_TIME_TARGET,
                "round time",
            ),
            ("secure-sum", "upload_vs_fp32_delta", SECURE_SUM_UPLOAD_TARGET, "upload / fp32 delta"),
        ]
        for mode, key, target, what in checks:
            value = cells.get(mode, {}).get(key)
            if value is None:
                continue
            state = "met" if value <= target else "MISSED"
            lines.append(
                f"{sites} sites: {mode} {what} {value:.3f}x (target <= {target}x): {state}"
            )
    return lines


def print_table(results: dict[str, dict[str, dict[str, Any]]], delta_bytes: int) -> None:
    header = (
        f"{'sites':>5}  {'mode':<10}  {'round s':>8}  {'x none':>6}  {'train s':>8}  "
        f"{'x none':>6}  {'eval s':>7}  {'x none':>6}  {'bytes up/site/round':>19}  "
        f"{'x none':>6}  {'/ fp32 delta':>12}"
    )
    print(header)
    print("-" * len(header))
    nan = float("nan")
    for sites, cells in results.items():
        for mode, cell in cells.items():
            print(
                f"{sites:>5}  {mode:<10}  {cell['round_seconds_mean']:>8.2f}  "
                f"{cell.get('round_seconds_mean_ratio_to_none', nan):>6.3f}  "
                f"{cell['train_seconds_mean']:>8.2f}  "
                f"{cell.get('train_seconds_mean_ratio_to_none', nan):>6.3f}  "
                f"{cell['eval_seconds_mean']:>7.2f}  "
                f"{cell.get('eval_seconds_mean_ratio_to_none', nan):>6.3f}  "
                f"{cell['bytes_up_per_site_per_round']:>19,.0f}  "
                f"{cell.get('bytes_up_per_site_per_round_ratio_to_none', nan):>6.3f}  "
                f"{cell['upload_vs_fp32_delta']:>12.4f}"
            )
    print(f"fp32 delta size: {delta_bytes:,} B")
    print("eval s: the evaluate stage does no privacy work in any mode; its ratio shows load drift")


def summarize(
    raw: dict[str, dict[str, list[dict[str, Any]]]], delta_bytes: int
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """Per (sites, mode) means, ratios and verdicts from the runs; prints the table."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for sites, by_mode in raw.items():
        results[sites] = {mode: mode_summary(runs) for mode, runs in by_mode.items()}
        add_ratios(results[sites], delta_bytes)
    lines = verdicts(results)
    print_table(results, delta_bytes)
    for line in lines:
        print(line)
    return results, lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Each run is `fedlora simulate CONFIG` with the quick overrides "
        + " ".join(QUICK_OVERRIDES)
        + " plus federation.sites=N and privacy.mode=MODE.",
    )
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "demo.toml")
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 20], help="site counts")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (interleaved)")
    parser.add_argument(
        "--parameters",
        type=int,
        default=460_800,
        help="adapter parameters of the fp32 delta the upload is compared to (default: "
        "SmolLM2-135M, r=8 on q_proj,v_proj); checked against the runs' summary.json",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra override K=V"
    )
    parser.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "out" / "privacy")
    parser.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "out" / "bench_privacy.json"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: recompute the table and verdicts from the runs recorded in --json",
    )
    args = parser.parse_args()

    delta_bytes = args.parameters * 4
    if args.report_only:
        report = json.loads(args.json.read_text(encoding="utf-8"))
        report["results"], report["verdicts"] = summarize(report["runs"], delta_bytes)
        report["reported"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"rewrote {args.json}")
        return 0

    if args.runs.exists():
        shutil.rmtree(args.runs)
    args.runs.mkdir(parents=True)
    started = time.perf_counter()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for sites in args.sites:
        for repeat in range(args.repeats):
            for mode in args.modes:
                name = f"s{sites}-{mode}-r{repeat}"
                out = args.runs / name
                overrides = [
                    *QUICK_OVERRIDES,
                    f"federation.sites={sites}",
                    f"privacy.mode='{mode}'",
                    *args.overrides,
                ]
                print(f"[{time.perf_counter() - started:7.1f} s] run {name}", flush=True)
                wall = run_simulate(
                    args.config, out, overrides, args.timeout, args.runs / f"{name}.log"
                )
                figures = run_figures(out, wall)
                if figures["adapter_parameters"] not in (None, args.parameters):
                    raise RuntimeError(
                        f"{name}: adapter has {figures['adapter_parameters']} parameters, "
                        f"not --parameters {args.parameters}"
                    )
                raw.setdefault(str(sites), {}).setdefault(mode, []).append(figures)
                print(
                    f"           wall {wall:.1f} s, round {mean(figures['round_seconds']):.2f} s, "
                    f"up/site {mean(figures['bytes_up_per_site']):,.0f} B",
                    flush=True,
                )

    results, lines = summarize(raw, delta_bytes)
    report = {
        **header("bench_privacy"),
        "config": str(args.config),
        "overrides": [*QUICK_OVERRIDES, *args.overrides],
        "fp32_delta_bytes": delta_bytes,
        "targets": {
            "sealed_round_time_ratio": SEALED_TIME_TARGET,
            "secure_sum_round_time_ratio": SECURE_SUM_TIME_TARGET,
            "secure_sum_upload_vs_fp32_delta": SECURE_SUM_UPLOAD_TARGET,
        },
        "total_wall_seconds": time.perf_counter() - started,
        "results": results,
        "verdicts": lines,
        "runs": raw,
    }
    write_result(args.json.stem, report, args.json.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
