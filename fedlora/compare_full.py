"""``fedlora compare``'s ``centralized-full`` arm: every base parameter trained on pooled data.

The reference LoRA is measured against: the same pooled training examples, the same steps per
round and rounds, batch order and optimizer settings as the ``centralized`` arm, but on a fresh
copy of the base model with every parameter trainable (the classification head included) and
no adapter. Reported beside quality: trainable parameters, peak resident memory, wall seconds
per optimizer step, and the bytes that a federation of full models would move per round per
site (the model down and the model up in fp32, as plain FedAvg of full weights does).

Before loading anything the arm estimates what full fine-tuning needs (``full_training_bytes``)
and compares it with the memory available on the model's device; where it would not fit, or
the base is 4-bit quantized (not trainable), the arm is skipped and says why. It never trains
something else in its place.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from client.site import round_seed
from client.train import train_local
from common.config import FederationConfig
from common.data import Example
from common.evaluation import EvalResult, evaluate_encoded
from common.models import load_base
from common.server_opt import scheduled_train
from common.tokens import Encoded, encode_examples, iterate_batches
from fedlora.compare_curves import CurvePoint
from fedlora.compare_measures import Arm, PeakRSS, Quality, data_bytes, quality_of
from fedlora.comparison import Comparison

NAME = "centralized-full"
FP32_BYTES = 4
# Per trainable parameter: fp32 weights + gradient + AdamW's two moments (bytes).
BYTES_PER_PARAMETER = 4 + 4 + 8
# Activations kept for the backward pass, per token and layer, in units of hidden size: about
# 34 bytes x hidden in 16-bit (Korthikanti et al. 2022, Table 2, no recomputation), doubled for
# fp32; plus 5 x heads x sequence for the attention scores, doubled likewise.
ACTIVATION_BYTES_PER_HIDDEN = 68
ATTENTION_BYTES_PER_SCORE = 10
# The logits of a causal LM (batch x tokens x vocabulary): the logits, the loss's float copy
# and their gradient, each 4 bytes.
LOGIT_COPIES = 3


@dataclass(frozen=True)
class FullResult:
    """The full fine-tuning arm: its ``Arm`` and curve, or the reason it was skipped."""

    arm: Arm | None
    curve: list[CurvePoint]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> str | None:
        reason = self.details.get("skipped")
        return str(reason) if reason else None


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes: CUDA's free memory, else Linux's MemAvailable.

    None where it cannot be read (no /proc/meminfo): the caller says so instead of guessing.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text(encoding="ascii").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file counts kB (KiB)
    return None


def full_training_bytes(
    parameters: int, config: Any, batch_size: int, max_length: int, causal_lm: bool
) -> int:
    """A rough upper estimate of the memory full fine-tuning with AdamW needs, in bytes.

    ``parameters`` x (4 weights + 4 gradient + 8 AdamW moments) plus the activations of one
    micro-batch of ``batch_size`` x ``max_length`` tokens (``config``: the model's transformers
    config; missing sizes count as 0).
    """
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    tokens = batch_size * max_length
    per_layer = tokens * (
        ACTIVATION_BYTES_PER_HIDDEN * hidden + ATTENTION_BYTES_PER_SCORE * heads * max_length
    )
    logits = tokens * int(getattr(config, "vocab_size", 0) or 0) * FP32_BYTES * LOGIT_COPIES
    return parameters * BYTES_PER_PARAMETER + layers * per_layer + (logits if causal_lm else 0)


def base_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the base model alone, where LoRA layers have been injected into it."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if "lora_" not in name and "modules_to_save" not in name
    )


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def fit_check(comparison: Comparison) -> dict[str, Any]:
    """The estimate against the available memory; ``skipped`` names why the arm cannot run."""
    cfg = comparison.cfg
    base = comparison.host.base
    parameters = base_parameter_count(base.model)
    train = comparison.plain.train
    causal = comparison.dataset.kind != "classification"
    needed = full_training_bytes(
        parameters, base.model.config, train.batch_size, train.max_length, causal
    )
    available = available_memory_bytes(base.placement.device)
    details: dict[str, Any] = {
        "estimated_bytes": needed,
        "available_bytes": available,
        "device": str(base.placement.device),
    }
    if cfg.model.quantize != "none":
        details["skipped"] = (
            f"model.quantize = {cfg.model.quantize!r}: a quantized base's weights are not "
            "trainable, so full fine-tuning is not possible on it"
        )
    elif available is not None and needed > available:
        details["skipped"] = (
            f"would not fit: full fine-tuning of {parameters:,} parameters needs about "
            f"{_gib(needed)} (weights, gradients, AdamW moments, activations), "
            f"{_gib(available)} available on {base.placement.device}"
        )
    elif available is None:
        details["note"] = "available memory unknown (no /proc/meminfo): trained without a check"
    return details


class _FullEvaluator:
    """The global set and every site's held-out split, encoded once, on a plain model."""

    def __init__(self, comparison: Comparison, tokenizer: Any) -> None:
        self.comparison = comparison
        self.pad = comparison.host.pad_token_id
        kind, length = comparison.dataset.kind, comparison.plain.train.max_length

        def encoded(examples: list[Example]) -> list[Encoded]:
            return encode_examples(examples, kind, tokenizer, length)

        self.global_items = encoded(comparison.global_examples)
        self.site_items = {s.site_id: encoded(s.data.heldout) for s in comparison.sites}

    def _evaluate(self, model: torch.nn.Module, items: list[Encoded]) -> EvalResult:
        return evaluate_encoded(model, items, self.comparison.host.task, self.pad)

    def quality(self, model: torch.nn.Module) -> Quality:
        own = {site: self._evaluate(model, items) for site, items in self.site_items.items()}
        return quality_of(self._evaluate(model, self.global_items), own)


def centralized_full(comparison: Comparison, lr: float | None = None) -> FullResult:
    """Train every parameter of a fresh base on the pooled data, or say why not.

    ``lr``: its learning rate where it should differ from the centralized arm's (full
    fine-tuning usually wants a far smaller one than LoRA).
    """
    details = fit_check(comparison)
    if "skipped" in details:
        print(f"{NAME}: skipped: {details['skipped']}")
        return FullResult(None, [], details)
    before = process_rss_bytes()
    start = time.perf_counter()
    with PeakRSS() as rss:
        trained = _train_full(comparison, lr)
    quality = trained.by_round[comparison.cfg.federation.rounds]  # always a curve round
    arm = Arm(
        NAME, quality, trained.trainable, trained.moved, time.perf_counter() - start, rss.peak
    )
    curve = [
        CurvePoint(r, *comparison._figures(q), trained.moved) for r, q in trained.by_round.items()
    ]
    details.update(
        {
            "steps": trained.steps,
            "train_seconds": trained.train_seconds,
            "seconds_per_step": trained.train_seconds / trained.steps,
            "lr": trained.lr,
            "optimizer": trained.optimizer,
            "full_federation_bytes_per_round_per_site": 2 * FP32_BYTES * trained.trainable,
            "peak_rss_growth_bytes": None
            if rss.peak is None or before is None
            else max(rss.peak - before, 0),
        }
    )
    return FullResult(arm, curve, details)


@dataclass(frozen=True)
class _Trained:
    by_round: dict[int, Quality]
    trainable: int
    moved: int
    steps: int
    train_seconds: float
    lr: float
    optimizer: str


def _train_full(comparison: Comparison, lr: float | None) -> _Trained:
    """The training loop of ``centralized_full``: centralized's plan, batches and rounds."""

    cfg = comparison.cfg
    labels = comparison.dataset.label_names
    pooled = [e for split in comparison.splits for e in split.train]
    steps = comparison.plan.train.local_steps * len(comparison.sites)
    train = comparison._plain_plan(steps).train
    if lr is not None:
        train = train.model_copy(update={"lr": lr})
    print(f"{NAME}: {len(pooled)} pooled examples, {steps} steps per round, every parameter")
    full = load_base(cfg.model, num_labels=len(labels) if labels else None)
    model = full.model
    model.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    evaluator = _FullEvaluator(comparison, full.tokenizer)
    pad = comparison.host.pad_token_id
    items = encode_examples(pooled, comparison.dataset.kind, full.tokenizer, train.max_length)
    by_round: dict[int, Quality] = {}
    seconds = 0.0
    for server_round in range(1, cfg.federation.rounds + 1):
        seed = round_seed(train.seed, server_round, 0)  # the centralized arm's batch order
        batches = iterate_batches(items, train.batch_size, seed, pad)
        # The run's lr schedule over rounds, as for the centralized arm (Comparison.train).
        scheduled = scheduled_train(train, cfg.aggregation, cfg.federation.rounds, server_round)
        seconds += train_local(model, batches, scheduled, seed).seconds
        if server_round in comparison.curve_rounds:
            by_round[server_round] = evaluator.quality(model)
    total = steps * cfg.federation.rounds
    moved = data_bytes(pooled)
    return _Trained(by_round, trainable, moved, total, seconds, train.lr, train.optimizer)


def full_lines(
    result: FullResult, federated: Arm, federation: FederationConfig, classification: bool
) -> list[str]:
    """Markdown lines on the full arm: quality against federated LoRA and what it cost."""
    if result.arm is None:
        return [f"- {NAME} skipped: {result.skipped}"]
    d, fed, full = result.details, federated.quality, result.arm.quality
    if classification:
        quality = (
            f"federated LoRA global accuracy {100 * (fed.global_accuracy or 0):.1f} % vs "
            f"{NAME} {100 * (full.global_accuracy or 0):.1f} %"
        )
    else:
        quality = (
            f"federated LoRA global perplexity {fed.global_perplexity:.3f} vs {NAME} "
            f"{full.global_perplexity:.3f}"
        )
    full_bytes = d["full_federation_bytes_per_round_per_site"]
    # The federated arm's bytes moved, per round and per site (every site takes part).
    lora_bytes = federated.bytes_moved / max(federation.rounds * federation.sites, 1)
    ratio = f" ({full_bytes / lora_bytes:,.0f}x the LoRA run's)" if lora_bytes else ""
    share = 100 * federated.trainable_parameters / result.arm.trainable_parameters
    return [
        f"- {quality}",
        f"- {NAME}: {result.arm.trainable_parameters:,} trainable parameters (federated LoRA: "
        f"{share:.2f} % of them), {d['seconds_per_step']:.3f} s per optimizer step over "
        f"{d['steps']} steps, {d['optimizer']} at lr {d['lr']:g}",
        f"- a federation of full models would move {full_bytes:,} bytes per round per site "
        f"(2 x the model in fp32){ratio}; the federated LoRA run moved {lora_bytes:,.0f} "
        "bytes per round per site on average",
    ]


def skipped_row(result: FullResult, columns: int) -> str:
    """The table row of a skipped arm: its name and the reason, the other cells empty."""
    return "| " + " | ".join([NAME, f"skipped: {result.skipped}", *["-"] * (columns - 2)]) + " |"


def process_rss_bytes() -> int | None:
    """This process's resident memory now, in bytes (None without /proc)."""
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return None
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
