"""fedlora's local training step vs a bare transformers + peft loop on the same batches.

Two copies of the same base model get the same LoRA initialisation: one is fedlora's
``AdapterHost`` trained with ``client.train.train_local``, the other a plain ``peft`` model
trained by the loop in ``bare_steps`` below (AdamW, forward, backward, step: nothing else).
Both see the same pre-collated batches of site 0 of the config, in blocks of ``--steps``
optimizer steps; blocks alternate which loop goes first, after two untimed warm-up blocks
each. A fresh optimizer per block and the same seed before each block, as ``train_local``
does per round, so both loops compute the same losses (checked) and only their overhead
differs.

Reported: seconds per step of each, and fedlora's throughput over the bare loop's: bare time
/ fedlora time summed over the timed blocks (target >= 0.9), with the per-block median and the
same ratio in CPU seconds.

    python benchmarks/bench_client_step.py                          # tiny-llama, tiny.toml
    python benchmarks/bench_client_step.py --model smollm2-135m     # demo.toml's data, ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
from bench_output import REPO, Clock, header, print_table, write_result
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from client.train import train_local
from common.adapter_host import AdapterHost, module_seed
from common.config import RunConfig, load_config
from common.data import load_dataset
from common.models import load_base
from common.partition import site_data
from common.tokens import encode_examples, iterate_batches

TARGET_RATIO = 0.9
# Untimed blocks per loop first: the first steps of a process pay for allocator and thread
# pool warm-up (up to 20x slower on tiny-llama), which says nothing about either loop.
WARMUP_BLOCKS = 2
Batch = dict[str, torch.Tensor]


def batches_for(cfg: RunConfig, host: AdapterHost, count: int) -> list[Batch]:
    """``count`` training batches of site 0, collated once (token ids, masks, labels)."""
    dataset = load_dataset(cfg.data)
    data = site_data(dataset, 0, cfg.federation.sites, cfg.data)
    items = encode_examples(data.train, dataset.kind, host.base.tokenizer, cfg.train.max_length)
    stream = iterate_batches(items, cfg.train.batch_size, cfg.train.seed, host.pad_token_id)
    return [next(stream) for _ in range(count)]


def bare_model(cfg: RunConfig) -> PeftModel:
    """The same base and LoRA initialisation as the ``AdapterHost``, through peft alone."""
    base = load_base(cfg.model).model
    module = cfg.modules["shared"]
    lora = LoraConfig(r=module.rank, lora_alpha=module.alpha, lora_dropout=module.dropout,
                      target_modules=list(module.targets), task_type=TaskType.CAUSAL_LM,
                      bias="none")  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(cfg.model.seed, "shared"))  # attach_adapters' seed
        return get_peft_model(base, lora, adapter_name="shared")


def bare_steps(model: PeftModel, batches: list[Batch], cfg: RunConfig, seed: int) -> list[float]:
    """The plain loop: fresh AdamW, then zero_grad / forward / backward / step per batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def fedlora_steps(
    host: AdapterHost, batches: list[Batch], cfg: RunConfig, seed: int
) -> list[float]:
    """``train_local`` over exactly these batches; returns the loss of every step."""
    train = cfg.train.model_copy(update={"local_steps": len(batches), "grad_accum": 1})
    losses: list[float] = []
    train_local(host.model, iter(batches), train, seed, lambda _s, _n, loss: losses.append(loss))
    return losses


def timed(call: Any) -> tuple[Clock, Any]:
    """Run ``call``; its wall and CPU seconds, and its result."""
    clock = Clock()
    with clock.running():
        result = call()
    return clock, result


def run_blocks(cfg: RunConfig, steps: int, repeats: int) -> dict[str, Any]:
    """``WARMUP_BLOCKS`` untimed, then ``repeats`` interleaved blocks of ``steps`` steps each."""
    host = AdapterHost(cfg.model, {"shared": cfg.modules["shared"]}, num_labels=None)
    bare = bare_model(cfg)
    count = repeats + WARMUP_BLOCKS
    batches = batches_for(cfg, host, steps * count)
    blocks = [batches[i * steps : (i + 1) * steps] for i in range(count)]
    clocks: dict[str, list[Clock]] = {"fedlora": [], "bare": []}
    loss_gap = 0.0
    for index, block in enumerate(blocks):
        seed = cfg.train.seed + index
        runs = [("fedlora", partial(fedlora_steps, host, block, cfg, seed)),
                ("bare", partial(bare_steps, bare, block, cfg, seed))]  # fmt: skip
        if index % 2:
            runs.reverse()  # alternate who goes first: drift and cache effects cancel
        results = {name: timed(call) for name, call in runs}
        pairs = zip(results["fedlora"][1], results["bare"][1], strict=True)
        loss_gap = max(loss_gap, *(abs(a - b) for a, b in pairs))
        if index < WARMUP_BLOCKS:
            continue
        for name in clocks:
            clocks[name].append(results[name][0])
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    fedlora_s = [c.wall / steps for c in clocks["fedlora"]]
    bare_s = [c.wall / steps for c in clocks["bare"]]
    cpu_ratio = sum(c.cpu for c in clocks["bare"]) / sum(c.cpu for c in clocks["fedlora"])
    return {"model": cfg.model.name, "steps_per_block": steps, "blocks": repeats,
            "batch_size": cfg.train.batch_size, "max_length": cfg.train.max_length,
            "tokens_per_batch_mean": tokens, "fedlora_step_s": fedlora_s, "bare_step_s": bare_s,
            "fedlora_step_s_median": statistics.median(fedlora_s),
            "bare_step_s_median": statistics.median(bare_s),
            "ratio_per_block": [b / f for f, b in zip(fedlora_s, bare_s, strict=True)],
            "ratio_of_totals": sum(bare_s) / sum(fedlora_s), "ratio_of_cpu_totals": cpu_ratio,
            "fedlora_cpu_s": [c.cpu for c in clocks["fedlora"]],
            "bare_cpu_s": [c.cpu for c in clocks["bare"]],
            "max_abs_loss_difference": loss_gap}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="default: examples/tiny.toml, or demo.toml for smollm2-135m",
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per block")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks per loop")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: a site of the simulation has 1 CPU)",
    )
    args = parser.parse_args()  # fmt: skip
    # Ray gives every 1-CPU site OMP_NUM_THREADS=1; one thread also keeps the comparison
    # clean on a busy machine, where spinning OpenMP workers slow either loop at random.
    torch.set_num_threads(args.threads)
    small = args.model == "tiny-llama"
    config = args.config or REPO / "examples" / ("tiny.toml" if small else "demo.toml")
    cfg = load_config(config, [f"model.name={args.model}", "model.device=cpu"])
    steps = args.steps or (50 if small else 2)
    repeats = args.repeats or (10 if small else 4)
    name = "bench_client_step" + ("" if small else f"_{args.model}")
    started = header(name)
    result = run_blocks(cfg, steps, repeats)
    # Throughput over the whole run: both loops ran interleaved through the same load.
    ratio = result["ratio_of_totals"]
    print_table(
        f"{result['model']}: {steps} steps per block x {repeats} blocks, batch "
        f"{result['batch_size']} x <= {result['max_length']} tokens "
        f"({result['tokens_per_batch_mean']:.0f} tokens per batch on average)",
        ["loop", "median s/step", "per block"],
        [["fedlora train_local", f"{result['fedlora_step_s_median']:.4f}",
          " ".join(f"{x:.4f}" for x in result["fedlora_step_s"])],
         ["bare peft loop", f"{result['bare_step_s_median']:.4f}",
          " ".join(f"{x:.4f}" for x in result["bare_step_s"])]],
    )  # fmt: skip
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(f"\nthroughput fedlora / bare: {ratio:.3f} (wall totals); per-block median "
          f"{statistics.median(result['ratio_per_block']):.3f}, CPU totals "
          f"{result['ratio_of_cpu_totals']:.3f} "
          f"(target >= {TARGET_RATIO}: {verdict}); "
          f"max |loss difference| {result['max_abs_loss_difference']:.2e}")  # fmt: skip
    write_result(name, {**started, "config": str(config), **result,
                        "ratio": ratio, "target_met": ratio >= TARGET_RATIO})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
