"""Which training setting survives label skew: a sweep of local objectives and optimizers.

Each setting is a list of ``--set`` overrides on one config (default ``examples/banking77.toml``:
10 sites, 8 of 77 labels each). Every setting runs the same in-process federation: the real
``SiteRuntime.train`` at every site (local loss, optimizer, delta) and the real server
optimizer (``common.server_opt``) on the example-weighted mean of the deltas, which is what
the ``fedavg`` rule computes for one module. No Flower, no envelopes: the sweep compares
training settings quickly; ``fedlora compare`` measures the chosen one through real Flower.

    python benchmarks/bench_label_skew.py [--config C] [--rounds 20] [--every 4]
        [--only NAME ...] [--set KEY=VALUE ...] [--name JSON_NAME]

Prints global accuracy (the config's eval set) every ``--every`` rounds per setting and
writes ``benchmarks/out/<--name>.json`` (default ``bench_label_skew``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench_output import REPO, header, print_table, write_result

from common.adapters import AdapterState
from common.config import load_config
from common.modules import join_modules, split_modules
from common.server_opt import server_optimizer_for
from fedlora.comparison import Comparison

FEDADAM = [
    "aggregation.server-optimizer='fedadam'",
    "aggregation.server-lr=0.01",
    "aggregation.server-tau=1e-6",
]
SGD = ["train.optimizer='sgd'", "train.lr=0.1"]
ADAMW = [
    "train.optimizer='adamw'",
    "train.lr=5e-3",
    "aggregation.server-optimizer='sgd'",
    "aggregation.server-lr=1.0",
]
# name -> overrides. The first is the old default (fresh local AdamW each round, FedAvg).
SETTINGS: dict[str, list[str]] = {
    "adamw + fedavg (old default)": [*ADAMW, "train.classifier-loss='plain'"],
    "adamw + restricted softmax": [*ADAMW, "train.classifier-loss='restricted'"],
    "adamw + FedRS alpha 0.5": [
        *ADAMW,
        "train.classifier-loss='restricted'",
        "train.restricted-alpha=0.5",
    ],
    "sgd + fedadam (shipped)": [*SGD, *FEDADAM, "train.classifier-loss='plain'"],
    "sgd + fedadam + restricted": [*SGD, *FEDADAM, "train.classifier-loss='restricted'"],
    "sgd + fedadam, server lr 0.02": [
        *SGD,
        *FEDADAM,
        "train.classifier-loss='plain'",
        "aggregation.server-lr=0.02",
    ],
    "sgd + fedadam + scaffold": [
        *SGD,
        *FEDADAM,
        "train.classifier-loss='plain'",
        "train.scaffold=true",
    ],
    "sgd + fedavg": [
        *SGD,
        "train.classifier-loss='plain'",
        "aggregation.server-optimizer='sgd'",
        "aggregation.server-lr=1.0",
    ],
    "sgd + fedavg + scaffold": [
        *SGD,
        "train.classifier-loss='plain'",
        "train.scaffold=true",
        "aggregation.server-optimizer='sgd'",
        "aggregation.server-lr=1.0",
    ],
    "sgd + fedadam, wsd to 0.1x": [
        *SGD,
        *FEDADAM,
        "train.classifier-loss='plain'",
        "aggregation.server-lr-schedule='wsd'",
    ],
    "sgd + fedadam, cosine to 0.1x": [
        *SGD,
        *FEDADAM,
        "train.classifier-loss='plain'",
        "aggregation.server-lr-schedule='cosine'",
    ],
    "sgd + fedadam lr 0.02, cosine to 0.1x": [
        *SGD,
        *FEDADAM,
        "train.classifier-loss='plain'",
        "aggregation.server-lr=0.02",
        "aggregation.server-lr-schedule='cosine'",
    ],
}


def federate(overrides: list[str], config: Path, rounds: int, every: int, name: str) -> list[Any]:
    """Run one setting; return [(round, global accuracy %, global loss)] every ``every`` rounds."""
    cfg = load_config(config, overrides)
    comparison = Comparison(cfg)
    plan = comparison.plan.model_copy(update={"clip": None})
    optimizer = server_optimizer_for(cfg.aggregation, rounds)
    state = {k: v.clone() for k, v in comparison.initial.items()}
    total = sum(len(site.data.train) for site in comparison.sites)
    control: AdapterState | None = {} if cfg.train.scaffold else None  # SCAFFOLD's c
    curve, start = [], time.perf_counter()
    for server_round in range(1, rounds + 1):
        mean: AdapterState = {}
        control_step: AdapterState = {}
        for site in comparison.sites:
            update = site.train(
                join_modules({comparison.module: state}),
                plan,
                server_round,
                server_round - 1,
                control=control,
            )
            weight = update.examples / total
            for key, value in split_modules(update.delta)[comparison.module].items():
                mean[key] = mean.get(key, 0) + weight * value
            for key, value in (update.control or {}).items():
                control_step[key] = control_step.get(key, 0) + weight * value
        state = optimizer.step(state, mean)
        if control is not None:
            control = {k: control.get(k, 0) + v for k, v in control_step.items()}
        if server_round % every == 0 or server_round == rounds:
            flat = join_modules({comparison.module: state})
            result = comparison.global_site.evaluate(flat, comparison.plain, 0)
            curve.append([server_round, round(100 * (result.accuracy or 0), 1), result.loss])
            seconds = time.perf_counter() - start
            print(
                f"{name}: round {server_round} global accuracy {curve[-1][1]} % "
                f"loss {result.loss:.3f} ({seconds:.0f} s)",
                flush=True,
            )
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "banking77.toml")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=None, help="setting names to run")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default="bench_label_skew", help="JSON file name under out/")
    args = parser.parse_args()
    result = header("bench_label_skew")
    result["settings"] = {}
    chosen = {k: v for k, v in SETTINGS.items() if args.only is None or k in args.only}
    for name, overrides in chosen.items():
        curve = federate([*args.overrides, *overrides], args.config, args.rounds, args.every, name)
        result["settings"][name] = {"overrides": [*args.overrides, *overrides], "curve": curve}
    rounds = [point[0] for point in next(iter(result["settings"].values()))["curve"]]
    rows = [
        [name, *(f"{point[1]:.1f}" for point in entry["curve"])]
        for name, entry in result["settings"].items()
    ]
    print_table("global accuracy % by round", ["setting", *map(str, rounds)], rows)
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
