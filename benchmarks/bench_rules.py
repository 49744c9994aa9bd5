"""Aggregation rules side by side: fedavg, ffa, fedsa, exact against centralized LoRA.

banking77 (``examples/banking77.toml``: MiniLM-L6, 77 labels, global evaluation on the test
split) with a Dirichlet(alpha) label mix over the sites, for every alpha and rule, plus one
centralized run (``federation.sites = 1``, the same rounds, ``local-steps x sites`` local
steps: the same number of examples seen per round). Reported per run: final global accuracy
(``global_eval_accuracy`` of the last round), the sites' mean held-out accuracy, and bytes up
per round (all sites) and per site. Optionally (``--dolly``) the same rules on dolly split by
instruction category (``examples/demo.toml``): held-out perplexity per site (category).

One subprocess ``fedlora simulate`` per run, sequentially; every run in sealed mode (``exact``
needs individual deltas). Target (issue 4): ``exact`` within 1 point of centralized LoRA on
banking77.

    python benchmarks/bench_rules.py [--alphas 0.1 1.0] [--rules fedavg ffa fedsa exact] [--dolly]

Note on ``fedsa``: B stays private at each site, so the coordinator's global adapter carries
the aggregated A with B at its initial value; its global accuracy measures that shared part
only. The sites' held-out accuracy (with their private B) is its meaningful figure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

from bench_output import header, run_simulate, trained_rounds, write_result

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only, as in common/config.py
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
RULES = ("fedavg", "ffa", "fedsa", "exact")
CENTRALIZED = "centralized"
EXACT_TARGET_POINTS = 1.0


def run_figures(out: Path, wall: float | None) -> dict[str, Any]:
    """Quality and bytes of one run from its metrics.jsonl."""
    rounds, trained = trained_rounds(out)
    first, last = rounds[0], rounds[-1]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    site_loss = {
        site: stages["evaluate"]["eval_loss"]
        for site, stages in last["sites"].items()
        if "evaluate" in stages
    }
    return {
        "wall_seconds": wall,
        "federation_seconds": summary.get("seconds"),
        "rounds": last["round"],
        "global_accuracy_first": first.get("global_eval_accuracy"),
        "global_accuracy_final": last.get("global_eval_accuracy"),
        "global_loss_final": last.get("global_eval_loss"),
        "site_accuracy_final": last.get("eval_accuracy"),
        "site_loss_first": first.get("eval_loss"),
        "site_loss_final": last.get("eval_loss"),
        "site_perplexity_final": {site: math.exp(loss) for site, loss in site_loss.items()},
        "bytes_up_per_round": mean(r["bytes_up"] for r in trained),
        "bytes_up_per_site_per_round": mean(
            r["bytes_up"] / len(r["cohort"]) for r in trained if r["cohort"]
        ),
        "rejected": sum(len(r.get("rejected", [])) for r in trained),
    }


def finished_run(out: Path, overrides: list[str]) -> bool:
    """True when ``out`` holds a finished run whose config.json agrees with every override."""
    if not (out / "summary.json").is_file() or not (out / "config.json").is_file():
        return False
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for item in overrides:
        key, raw = item.split("=", 1)
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node: Any = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        if node != value:
            return False
    return True


def banking_overrides(args: argparse.Namespace, rule: str, alpha: float | None) -> list[str]:
    sites, steps = args.sites, args.local_steps
    if rule == CENTRALIZED:
        sites, steps, rule = 1, args.local_steps * args.sites, "fedavg"
    items = [
        f"federation.sites={sites}",
        f"federation.rounds={args.rounds}",
        f"train.local-steps={steps}",
        f"train.batch-size={args.batch_size}",
        f"data.max-eval-examples={args.max_eval_examples}",
        f"aggregation.rule='{rule}'",
        f"privacy.mode='{args.privacy_mode}'",
    ]
    if alpha is not None:
        items += ["data.partition='dirichlet'", f"data.alpha={alpha}"]
    extra: list[str] = args.overrides
    return items + extra


def dolly_overrides(args: argparse.Namespace, rule: str) -> list[str]:
    sites, steps = 3, args.dolly_local_steps
    items = [f"federation.rounds={args.dolly_rounds}", f"privacy.mode='{args.privacy_mode}'"]
    if rule == CENTRALIZED:
        items += ["federation.sites=1", "aggregation.rule='fedavg'"]
        steps *= sites
    else:
        items.append(f"aggregation.rule='{rule}'")
    return [*items, f"train.local-steps={steps}"]


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def print_banking(results: dict[str, dict[str, Any]], alphas: list[str]) -> None:
    head = f"{'rule':<12}"
    for alpha in alphas:
        head += f"  {'a=' + alpha + ' global %':>16}  {'site %':>7}  {'up B/round':>11}"
    print(head)
    print("-" * len(head))
    central = results.get(CENTRALIZED, {}).get("-")
    for rule, by_alpha in results.items():
        if rule == CENTRALIZED:
            continue
        row = f"{rule:<12}"
        for alpha in alphas:
            cell = by_alpha.get(alpha)
            if cell is None:
                row += f"  {'-':>16}  {'-':>7}  {'-':>11}"
                continue
            row += (
                f"  {pct(cell['global_accuracy_final']):>16}  "
                f"{pct(cell['site_accuracy_final']):>7}  {cell['bytes_up_per_round']:>11,.0f}"
            )
        print(row)
    if central is not None:
        print(
            f"{CENTRALIZED:<12}  global {pct(central['global_accuracy_final'])} %, "
            f"site {pct(central['site_accuracy_final'])} %, "
            f"up {central['bytes_up_per_round']:,.0f} B/round (1 site, any alpha)"
        )


def print_dolly(results: dict[str, dict[str, Any]]) -> None:
    sites = sorted({s for cell in results.values() for s in cell["site_perplexity_final"]})
    head = f"{'rule':<12}  " + "  ".join(f"{s:>8}" for s in sites)
    head += f"  {'mean loss':>9}  {'up B/round':>11}"
    print(head)
    print("-" * len(head))
    for rule, cell in results.items():
        ppl = cell["site_perplexity_final"]
        row = f"{rule:<12}  " + "  ".join(
            f"{ppl[s]:>8.3f}" if s in ppl else f"{'-':>8}" for s in sites
        )
        print(row + f"  {cell['site_loss_final']:>9.4f}  {cell['bytes_up_per_round']:>11,.0f}")


def verdict(results: dict[str, dict[str, Any]]) -> list[str]:
    central = results.get(CENTRALIZED, {}).get("-")
    exact = results.get("exact", {})
    if central is None or not exact or central["global_accuracy_final"] is None:
        return ["exact vs centralized: not measured"]
    lines = []
    for alpha, cell in exact.items():
        gap = 100 * (central["global_accuracy_final"] - cell["global_accuracy_final"])
        state = "met" if gap <= EXACT_TARGET_POINTS else "MISSED"
        lines.append(
            f"alpha {alpha}: exact {pct(cell['global_accuracy_final'])} % vs centralized "
            f"{pct(central['global_accuracy_final'])} %: {gap:+.2f} points below "
            f"(target <= {EXACT_TARGET_POINTS} point): {state}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Runs go to --runs/<name> (with <name>.log); the JSON report to --json.",
    )
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "banking77.toml")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-eval-examples", type=int, default=512)
    parser.add_argument(
        "--privacy-mode", choices=["sealed", "none"], default="sealed", help="for every run"
    )
    parser.add_argument(
        "--no-centralized", action="store_true", help="skip the centralized baseline"
    )
    parser.add_argument("--dolly", action="store_true", help="also run dolly by category")
    parser.add_argument("--dolly-config", type=Path, default=REPO / "examples" / "demo.toml")
    parser.add_argument("--dolly-rounds", type=int, default=2)
    parser.add_argument("--dolly-local-steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra banking77 K=V"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep --runs and take a finished run there as it is when its config.json agrees "
        "with the run's overrides (e.g. after an interrupted benchmark); wall time then null",
    )
    parser.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "out" / "rules")
    parser.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "out" / "bench_rules.json"
    )
    args = parser.parse_args()

    if args.runs.exists() and not args.reuse:
        shutil.rmtree(args.runs)
    args.runs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def one(config: Path, name: str, overrides: list[str]) -> dict[str, Any]:
        print(f"[{time.perf_counter() - started:7.1f} s] run {name}", flush=True)
        out = args.runs / name
        wall: float | None = None
        if args.reuse and finished_run(out, overrides):
            print("           reused the finished run there", flush=True)
        else:
            if out.exists():
                shutil.rmtree(out)
            log = args.runs / f"{name}.log"
            wall = run_simulate(config, out, overrides, args.timeout, log)
        figures = run_figures(out, wall)
        shown = "-" if wall is None else f"{wall:.1f}"
        print(
            f"           wall {shown} s, global acc {pct(figures['global_accuracy_final'])}, "
            f"site acc {pct(figures['site_accuracy_final'])}, "
            f"site loss {figures['site_loss_final']:.4f}",
            flush=True,
        )
        return {"overrides": overrides, **figures}

    banking: dict[str, dict[str, Any]] = {}
    alphas = [f"{a:g}" for a in args.alphas]
    if not args.no_centralized:
        name = "banking77-centralized"
        banking[CENTRALIZED] = {
            "-": one(args.config, name, banking_overrides(args, CENTRALIZED, None))
        }
    for alpha, label in zip(args.alphas, alphas, strict=True):
        for rule in args.rules:
            name = f"banking77-a{label}-{rule}"
            cell = one(args.config, name, banking_overrides(args, rule, alpha))
            banking.setdefault(rule, {})[label] = cell
    dolly: dict[str, dict[str, Any]] = {}
    if args.dolly:
        for rule in [*args.rules, *([] if args.no_centralized else [CENTRALIZED])]:
            dolly[rule] = one(args.dolly_config, f"dolly-{rule}", dolly_overrides(args, rule))

    print("\nbanking77: final global accuracy (test split), sites' held-out accuracy, bytes up")
    print_banking(banking, alphas)
    if dolly:
        print("\ndolly by category: held-out perplexity per site after the last round")
        print_dolly(dolly)
    else:
        print("\ndolly by category: not run (pass --dolly)")
    lines = verdict(banking)
    for line in lines:
        print(line)
    report = {
        **header("bench_rules"),
        "banking77_config": str(args.config),
        "dolly_config": str(args.dolly_config) if args.dolly else None,
        "total_wall_seconds": time.perf_counter() - started,
        "banking77": banking,
        "dolly": dolly or None,
        "verdicts": lines,
    }
    write_result(args.json.stem, report, args.json.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
