"""Deployment round overhead: the loopback deployment vs the same federation in simulation.

Runs, one after the other, (1) ``scripts/e2e-loopback.sh`` with ``ROUNDS=N``: the coordinator
(SuperLink with TLS + SuperNode authentication, the ServerApp in its SuperExec) and 3 site
daemons (SuperNodes with the fedlora ClientApp) as real processes on 127.0.0.1,
``examples/tiny.toml``; and (2) ``fedlora simulate examples/tiny.toml`` with the same number of
rounds and sites, iid split (the loopback sites each hold a third of the same file), once per
privacy mode named (default sealed; ``--privacy sealed secure-sum`` puts the secure sum's
stages beside sealed mode). Both write ``metrics.jsonl``; the table compares the mean round
time (rounds >= 1), the train and evaluate stages, bytes up per site, and the wall time from
start to summary.

    python benchmarks/bench_deploy.py [--rounds 3] [--repeats 1] [--privacy sealed secure-sum]

The loopback wall time includes starting the SuperLink, registering the sites' keys and
starting three SuperNodes; the simulation's includes starting Ray. Round figures exclude both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path
from statistics import mean
from typing import Any

from bench_output import (
    OUT_DIR,
    REPO,
    header,
    print_table,
    run_simulate,
    trained_rounds,
    write_result,
)

TINY = REPO / "examples" / "tiny.toml"
SCRIPT = REPO / "scripts" / "e2e-loopback.sh"


def figures(run: Path, wall: float) -> dict[str, Any]:
    """Round figures of one run folder (its ``metrics.jsonl``)."""
    _, trained = trained_rounds(run)
    return {
        "wall_seconds": wall,
        "round_seconds": [r["seconds"] for r in trained],
        "train_seconds": [r["seconds_train"] for r in trained],
        "eval_seconds": [r["seconds_eval"] for r in trained],
        "bytes_up_per_site": [r["bytes_up"] / len(r["cohort"]) for r in trained if r["cohort"]],
        "cohorts": [sorted(r["cohort"]) for r in trained],
    }


def run_loopback(work: Path, rounds: int, privacy: str, timeout: float) -> dict[str, Any]:
    """The deployment on loopback; its run folder is ``work/runs/tiny``."""
    env = {**os.environ, "ROUNDS": str(rounds), "PRIVACY": privacy}
    start = time.perf_counter()
    with (work.parent / f"{work.name}.log").open("w", encoding="utf-8") as log:
        subprocess.run(
            ["bash", str(SCRIPT), str(work)],
            check=True,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    return figures(work / "runs" / "tiny", time.perf_counter() - start)


def run_simulation(out: Path, rounds: int, privacy: str, timeout: float) -> dict[str, Any]:
    """The same federation in Flower's simulation engine."""
    overrides = [f"federation.rounds={rounds}", "data.partition='iid'", f"privacy.mode='{privacy}'"]
    wall = run_simulate(TINY, out, overrides, timeout, out.parent / f"{out.name}.log")
    return figures(out, wall)


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "round_seconds": mean(s for r in runs for s in r["round_seconds"]),
        "train_seconds": mean(s for r in runs for s in r["train_seconds"]),
        "eval_seconds": mean(s for r in runs for s in r["eval_seconds"]),
        "bytes_up_per_site": mean(b for r in runs for b in r["bytes_up_per_site"]),
        "wall_seconds": mean(r["wall_seconds"] for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine, interleaved")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    parser.add_argument("--runs", type=Path, default=OUT_DIR / "deploy")
    parser.add_argument(
        "--privacy",
        nargs="+",
        default=["sealed"],
        choices=["sealed", "secure-sum"],
        help="privacy modes, each run by both engines (default: sealed)",
    )
    args = parser.parse_args()

    result = header("bench_deploy")
    if args.runs.exists():
        shutil.rmtree(args.runs)
    args.runs.mkdir(parents=True)
    raw: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for privacy in args.privacy:
            for engine, run in (("loopback", run_loopback), ("simulation", run_simulation)):
                print(
                    f"[repeat {repeat}] {engine}, {privacy}, {args.rounds} rounds ...", flush=True
                )
                folder = args.runs / f"{engine}-{privacy}-{repeat}"
                cell = raw.setdefault(f"{engine} {privacy}", [])
                cell.append(run(folder, args.rounds, privacy, args.timeout))

    cells = {name: summary(runs) for name, runs in raw.items()}
    rows = []
    for name, cell in cells.items():
        sim = cells[f"simulation {name.split()[1]}"]
        rows.append(
            [
                name,
                f"{cell['round_seconds']:.2f}",
                f"{cell['round_seconds'] / sim['round_seconds']:.2f}",
                f"{cell['train_seconds']:.2f}",
                f"{cell['eval_seconds']:.2f}",
                f"{cell['bytes_up_per_site']:,.0f}",
                f"{cell['wall_seconds']:.1f}",
            ]
        )
    print_table(
        f"tiny-llama, 3 sites, {args.rounds} rounds, {args.repeats} run(s) per engine and mode",
        ["engine, privacy", "round s", "x sim", "train s", "eval s", "bytes up/site", "wall s"],
        rows,
    )
    result.update(
        rounds=args.rounds,
        repeats=args.repeats,
        privacy=args.privacy,
        runs=raw,
        results=cells,
    )
    write_result("bench_deploy", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
