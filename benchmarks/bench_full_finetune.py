"""LoRA against full fine-tuning on one config: the ``compare`` arms' cost figures, quickly.

Runs ``fedlora compare``'s ``centralized`` (LoRA) and ``centralized-full`` arms for
``--rounds`` rounds (no federation), then times optimizer steps of both *interleaved*, a few
steps of one and then of the other, ``--reps`` times, on the same batches: on a shared machine
whose load changes by the minute, only interleaved timings compare. Prints and writes JSON:
trainable parameters, peak RSS, the full arm's estimate and RSS growth, bytes per round per site
of a federation of full models, the arms' quality after ``--rounds`` rounds, and the median
seconds per step of each (the first repetition left out as warm-up).

    python benchmarks/bench_full_finetune.py examples/banking77.toml --rounds 1 \
        --reference train.optimizer=adamw --reference train.lr=5e-3 --full-lr 5e-5 \
        --set data.max-eval-examples=128 --out benchmarks/out/full-b77.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from client.site import round_seed
from client.train import train_local
from common.config import load_config
from common.models import load_base
from common.tokens import encode_examples, iterate_batches
from fedlora.compare import reference_train
from fedlora.compare_full import centralized_full
from fedlora.comparison import Comparison

STEPS_PER_REP = 5


def interleaved_seconds(
    comparison: Comparison, lr: float, full_lr: float, reps: int
) -> dict[str, list[float]]:
    """Seconds per step of the LoRA host and of a fresh full model, alternating."""
    labels = comparison.dataset.label_names
    full = load_base(comparison.cfg.model, num_labels=len(labels) if labels else None).model
    full.requires_grad_(True)
    pooled = [e for split in comparison.splits for e in split.train]
    train = comparison._plain_plan(STEPS_PER_REP).train
    items = encode_examples(
        pooled, comparison.dataset.kind, comparison.host.base.tokenizer, train.max_length
    )
    pad = comparison.host.pad_token_id
    models: dict[str, tuple[torch.nn.Module, float]] = {
        "lora": (comparison.host.model, lr),
        "full": (full, full_lr),
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(reps):
        seed = round_seed(train.seed, rep + 1, 0)
        for name, (model, rate) in models.items():
            batches = iterate_batches(items, train.batch_size, seed, pad)
            result = train_local(model, batches, train.model_copy(update={"lr": rate}), seed)
            times[name].append(result.seconds / result.steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--reference", action="append", default=[])
    parser.add_argument("--full-lr", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"federation.rounds={args.rounds}", *args.overrides])
    comparison = Comparison(cfg, curve_points=1, reference=reference_train(cfg, args.reference))
    central, _ = comparison.centralized()
    full = centralized_full(comparison, args.full_lr)
    lr = comparison.plain.train.lr
    times = interleaved_seconds(comparison, lr, args.full_lr or lr, args.reps)
    medians = {name: statistics.median(values[1:] or values) for name, values in times.items()}
    result: dict[str, Any] = {
        "config": str(args.config),
        "rounds": args.rounds,
        "centralized": asdict(central),
        "centralized_full": asdict(full.arm) if full.arm is not None else None,
        "full_details": full.details,
        "seconds_per_step_interleaved": times,
        "median_seconds_per_step": medians,
        "full_over_lora_seconds_per_step": medians["full"] / medians["lora"],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
