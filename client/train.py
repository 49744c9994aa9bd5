"""Local LoRA training at one site: peft on a frozen base, no Flower, no crypto.

Reads top to bottom like nanoGPT's train loop: the received global weights are loaded into the
adapter host (``common.adapter_host``), then ``local_steps`` optimizer steps run on seeded
batches and report loss, time and memory. Evaluation is ``common.evaluation``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import torch
from peft import PeftModel
from transformers import get_scheduler

from client.drift import DriftCorrection
from client.losses import calibrated_cross_entropy, proximal_penalty, restricted_cross_entropy
from client.site_api import StepCallback, TrainResult
from common.config import TrainConfig
from common.evaluation import to_device
from common.models import peak_memory_bytes

logger = logging.getLogger(__name__)


def freeze_lora_a(model: PeftModel) -> None:
    """Freeze the A factors (FFA-LoRA); B and saved modules stay trainable.

    ``common.adapter_host.activate`` makes every factor of the active modules trainable again.
    """
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)


def local_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    counts: torch.Tensor | None,
) -> torch.Tensor:
    """The site's training loss on one batch: the model's own, or a skew-robust one.

    ``counts`` (examples per label at this site) selects the classification objective of
    ``cfg.classifier_loss``; None (causal LM) keeps the model's own loss.
    """
    if counts is None or cfg.classifier_loss == "plain":
        return model(**batch).loss
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    if cfg.classifier_loss == "restricted":
        return restricted_cross_entropy(logits, batch["labels"], counts, cfg.restricted_alpha)
    return calibrated_cross_entropy(logits, batch["labels"], counts, cfg.calibration_tau)


def train_local(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    seed: int,
    on_step: StepCallback | None = None,
    counts: torch.Tensor | None = None,
    drift: DriftCorrection | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` optimizer steps (each of ``cfg.grad_accum`` micro-batches).

    ``cfg.optimizer``: AdamW, or SGD with momentum (linear in the gradients, for label skew).
    The optimizer state starts fresh every round, as in FedIT: only the adapter travels.
    ``counts``: a classification site's examples per label (``local_loss``). With
    ``cfg.proximal_mu`` the loss adds FedProx's pull toward the received (starting) tensors.
    ``cfg.lr_scheduler`` / ``warmup_steps`` shape the lr over the round's steps, and
    ``cfg.max_grad_norm`` clips each step's gradient norm. ``drift`` (SCAFFOLD,
    ``client.drift``) records each step's raw data gradient and adds ``c - c_i`` to it.
    Deterministic on CPU for a fixed ``seed`` (dropout RNG and batch order are seeded).
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else []
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # transformers' schedules: the first warm-up step has lr 0, as in its Trainer.
    schedule = get_scheduler(
        "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.local_steps,
    )
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, cfg.local_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            loss = local_loss(model, to_device(next(batches), device), cfg, counts)
            (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
        if drift is not None:
            drift.record_and_correct()
        if anchors:  # the data loss is what is reported; the penalty only steers the step
            proximal_penalty(params, anchors, cfg.proximal_mu).backward()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training loss became {step_loss} at step {step}")
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(step_loss)
        if on_step is not None:
            on_step(step, cfg.local_steps, step_loss)
    model.eval()
    return TrainResult(
        loss=sum(losses) / len(losses),
        first_loss=losses[0],
        last_loss=losses[-1],
        steps=len(losses),
        seconds=time.perf_counter() - start,
        peak_memory_bytes=peak_memory_bytes(device),
    )
