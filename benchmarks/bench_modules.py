"""What adapter modules buy: shared only vs shared + private vs shared + group + private.

Dolly by category with SmolLM2-135M (``examples/demo.toml``: 3 sites = brainstorming,
classification, closed_qa; the same data, rounds, steps and seed in every arm). Arms:

- ``shared``: the demo's one shared module (r=8 on q_proj, v_proj);
- ``shared+private``: plus a private module per site (r=4 on q_proj), never sent;
- ``shared+group+private``: plus a ``qa`` module (r=4) aggregated over the two QA-like sites
  (classification, closed_qa) only.

Reported per arm: each site's held-out perplexity with the modules it holds (round 0 = base
model, and after the last round), bytes up per round, trainable parameters per site, wall
seconds. One subprocess ``fedlora simulate`` per arm, sequentially.

    python benchmarks/bench_modules.py [--rounds 3] [--local-steps 6] [--out benchmarks/out/modules]
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from statistics import mean
from typing import Any

from bench_output import REPO, header, print_table, run_simulate, trained_rounds, write_result

PRIVATE = """
[modules.style]
scope = "private"
rank = 4
alpha = 8
targets = ["q_proj"]
"""
GROUP = """
[modules.qa]
scope = "group:qa"
rank = 4
alpha = 8
targets = ["q_proj", "v_proj"]

[groups]
qa = ["site-1", "site-2"]
"""
ARMS = {"shared": "", "shared+private": PRIVATE, "shared+group+private": PRIVATE + GROUP}


def arm_figures(out: Path, wall: float) -> dict[str, Any]:
    """Per-site perplexity (first and last evaluated round), bytes and parameters of one run."""
    rounds, trained = trained_rounds(out)
    first, last = rounds[0], rounds[-1]

    def perplexity(line: dict[str, Any]) -> dict[str, float]:
        return {
            site: math.exp(stages["evaluate"]["eval_loss"])
            for site, stages in sorted(line["sites"].items())
            if "evaluate" in stages
        }

    params: dict[str, int] = {}
    for store in sorted((out / "sites").glob("*/*/registry")):  # <site>/<run id>/registry
        modules = sorted(p for p in store.iterdir() if p.is_dir())
        latest = [sorted(v for v in m.iterdir() if v.name.startswith("v"))[-1] for m in modules]
        params[store.parent.parent.name] = sum(_count(version) for version in latest)
    return {
        "wall_seconds": wall,
        "rounds": last["round"],
        "perplexity_base": perplexity(first),
        "perplexity_final": perplexity(last),
        "bytes_up_per_round": mean(r["bytes_up"] for r in trained),
        "trainable_parameters_per_site": params,
    }


def _count(version: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(version / "adapter_model.safetensors")).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "modules")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    result = header("bench_modules")
    demo = (REPO / "examples" / "demo.toml").read_text(encoding="utf-8")
    data = REPO / "examples" / "data" / "dolly-demo.jsonl"
    overrides = [
        f"data.path='{data}'",
        f"federation.rounds={args.rounds}",
        f"train.local-steps={args.local_steps}",
    ]
    result["overrides"] = overrides
    arms: dict[str, Any] = {}
    for name, extra in ARMS.items():
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        config = args.out / f"{name}.toml"
        config.write_text(demo + extra, encoding="utf-8")
        print(f"running {name} ...", flush=True)
        wall = run_simulate(config, out / "run", overrides, args.timeout, out / "log.txt")
        arms[name] = arm_figures(out / "run", wall)
    result["arms"] = arms
    sites = sorted(arms["shared"]["perplexity_final"])
    rows = []
    for name, figures in arms.items():
        rows.append(
            [
                name,
                *(
                    f"{figures['perplexity_base'][s]:.3f} -> {figures['perplexity_final'][s]:.3f}"
                    for s in sites
                ),
                f"{figures['bytes_up_per_round']:,.0f}",
                ", ".join(f"{v:,}" for v in figures["trainable_parameters_per_site"].values()),
                f"{figures['wall_seconds']:.0f}",
            ]
        )
    columns = ["arm", *(f"{s} ppl" for s in sites), "bytes up/round", "params/site", "wall s"]
    print_table("Adapter modules on dolly by category (SmolLM2-135M)", columns, rows)
    write_result("bench_modules", result)


if __name__ == "__main__":
    main()
