"""What one federated round costs: wall time, peak memory, bytes per site, step time.

Runs ``fedlora simulate CONFIG`` as a subprocess (default: the demo config), then reads the
run's ``metrics.jsonl`` and ``summary.json``. Prints a table and writes JSON next to the run.

    python benchmarks/bench_round.py [--config examples/demo.toml] [--out benchmarks/out/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def run_federation(config: Path, out: Path, overrides: list[str]) -> float:
    """Run the simulation; return its wall time in seconds (setup of the venv excluded)."""
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", str(config), "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - start


def figures(out: Path, wall: float) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rounds if r["round"] > 0]
    sites = summary["sites"]
    step_seconds = [
        s["train"]["seconds"] / s["train"]["steps"]
        for r in trained
        for s in r["sites"].values()
        if "train" in s
    ]
    up_per_site = [r["bytes_up"] / len(r["cohort"]) for r in trained if r["cohort"]]
    down_per_site = [r["bytes_down"] / sites for r in trained]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {_cpu_count()} cores",
        "model": summary["base_model"],
        "sites": sites,
        "rounds": summary["rounds"],
        "wall_seconds": wall,
        "federation_seconds": summary["seconds"],
        "round_seconds_mean": sum(r["seconds"] for r in trained) / len(trained),
        "step_seconds_median": sorted(step_seconds)[len(step_seconds) // 2],
        "peak_site_rss_bytes": summary["peak_site_memory_bytes"],
        "coordinator_peak_rss_bytes": summary["coordinator_peak_memory_bytes"],
        "bytes_up_per_site_per_round": sum(up_per_site) / len(up_per_site),
        "bytes_down_per_site_per_round": sum(down_per_site) / len(down_per_site),
        "base_model_bytes": summary["base_bytes"],
        "adapter_parameters": summary["adapter_parameters"],
        "eval_loss_first_last": [summary["initial_eval_loss"], summary["final_eval_loss"]],
        "site_eval_loss_first_last": {
            site: [
                rounds[0]["sites"][site]["evaluate"]["eval_loss"],
                rounds[-1]["sites"][site]["evaluate"]["eval_loss"],
            ]
            for site in rounds[0]["sites"]
        },
    }


def _cpu_count() -> int:
    return os.cpu_count() or 1


def print_table(result: dict[str, Any]) -> None:
    mib = 1024 * 1024
    rows = [
        ("model / sites / rounds", f"{result['model']} / {result['sites']} / {result['rounds']}"),
        ("wall time (process)", f"{result['wall_seconds']:.1f} s"),
        ("mean round (train + eval)", f"{result['round_seconds_mean']:.1f} s"),
        ("median local step", f"{result['step_seconds_median']:.2f} s"),
        ("peak RSS, one site process", f"{result['peak_site_rss_bytes'] / mib:.0f} MiB"),
        ("peak RSS, coordinator", f"{result['coordinator_peak_rss_bytes'] / mib:.0f} MiB"),
        ("bytes up / site / round", f"{result['bytes_up_per_site_per_round']:,.0f}"),
        ("bytes down / site / round", f"{result['bytes_down_per_site_per_round']:,.0f}"),
        ("full base model (fp32)", f"{result['base_model_bytes']:,}"),
        (
            "up-delta / base model",
            f"{result['bytes_up_per_site_per_round'] / result['base_model_bytes']:.5f}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for site, (first, last) in result["site_eval_loss_first_last"].items():
        print(f"{site} held-out loss {first:.4f} -> {last:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "demo.toml")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "round")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    wall = run_federation(args.config, args.out, args.overrides)
    result = {"command": " ".join(sys.argv), "config": str(args.config), **figures(args.out, wall)}
    print_table(result)
    (args.out / "bench_round.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_round.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
