"""Local LoRA training and evaluation at one site: peft on a frozen base, no Flower, no crypto.

Reads top to bottom like nanoGPT's train loop: build the adapter, load the received global
weights, run ``local_steps`` optimizer steps on seeded batches, report loss, time and memory.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

# The result types live with the Site protocol (no peft there); re-exported for callers.
from client.losses import calibrated_cross_entropy, proximal_penalty, restricted_cross_entropy
from client.site_api import EvalResult as EvalResult
from client.site_api import StepCallback as StepCallback
from client.site_api import TrainResult as TrainResult
from common.adapters import AdapterState
from common.config import ModuleConfig, Task, TrainConfig
from common.errors import ModelError, UpdateRejected
from common.models import peak_memory_bytes

logger = logging.getLogger(__name__)


def lora_config(module: ModuleConfig, task: Task) -> LoraConfig:
    """The peft ``LoraConfig`` of one module, for a causal LM or a sequence classifier."""
    return LoraConfig(
        r=module.rank,
        lora_alpha=module.alpha,
        lora_dropout=module.dropout,
        target_modules=list(module.targets),
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
        bias="none",
    )


def module_seed(seed: int, module: str) -> int:
    """The init seed of one module: the same wherever it is attached, whatever else is."""
    return (seed * 1_000_003 + zlib.crc32(module.encode())) % (2**31 - 1)


def attach_adapters(
    model: PreTrainedModel, configs: Mapping[str, LoraConfig], seed: int
) -> PeftModel:
    """Inject one named LoRA adapter per module into ``model`` (in place), all active.

    Each module's initialisation is seeded by (``seed``, its name), so a module starts the
    same at the coordinator and at every site, whichever other modules each one holds. The
    coordinator publishes its initialisation as version 0; sites overwrite it with the global
    weights they receive.
    """
    names = sorted(configs)
    peft_model: PeftModel | None = None
    for name in names:
        config = configs[name]
        missing = [m for m in config.target_modules or [] if not _has_module(model, m)]
        if missing:
            raise ModelError(f"modules.{name}.targets: no module named {missing} in the base model")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed(seed, name))
            if peft_model is None:
                peft_model = get_peft_model(model, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
    if peft_model is None:
        raise ModelError("no adapter module to attach")
    activate(peft_model, names)
    return peft_model


def activate(model: PeftModel, modules: list[str]) -> None:
    """Make ``modules`` the active (and trainable) adapters; the others are left out."""
    if len(modules) == 1:
        model.set_adapter(modules[0])
    else:  # peft's multi-adapter forward: the active adapters' products are summed
        tuner: Any = model.base_model  # peft's LoraModel; typed as a Module attribute
        tuner.set_adapter(list(modules))


def freeze_lora_a(model: PeftModel) -> None:
    """Freeze the A factors (FFA-LoRA); B and saved modules stay trainable.

    ``activate`` makes every factor of the active modules trainable again.
    """
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)


def _has_module(model: torch.nn.Module, suffix: str) -> bool:
    return any(name.split(".")[-1] == suffix for name, _ in model.named_modules())


def adapter_state(model: PeftModel, module: str) -> AdapterState:
    """One module's trainable tensors (peft's saved key names), as float32 CPU copies."""
    state = get_peft_model_state_dict(model, adapter_name=module)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def load_adapter_state(model: PeftModel, state: AdapterState, module: str) -> None:
    """Overwrite one module with ``state``; its keys and shapes must match exactly."""
    current = get_peft_model_state_dict(model, adapter_name=module)
    if set(current) != set(state):
        missing = sorted(set(current) - set(state))[:3]
        extra = sorted(set(state) - set(current))[:3]
        raise UpdateRejected(
            f"module {module!r}: adapter keys differ: missing {missing}, unexpected {extra}"
        )
    for key, tensor in state.items():
        if tuple(current[key].shape) != tuple(tensor.shape):
            raise UpdateRejected(
                f"module {module!r}: adapter tensor {key}: expected shape "
                f"{tuple(current[key].shape)}, got {tuple(tensor.shape)}"
            )
    result = set_peft_model_state_dict(model, state, adapter_name=module)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise UpdateRejected(f"module {module!r}: peft did not accept keys {unexpected[:3]}")


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


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
) -> TrainResult:
    """Run ``cfg.local_steps`` optimizer steps (each of ``cfg.grad_accum`` micro-batches).

    ``cfg.optimizer``: AdamW, or SGD with momentum (linear in the gradients, for label skew).
    The optimizer state starts fresh every round, as in FedIT: only the adapter travels.
    ``counts``: a classification site's examples per label (``local_loss``). With
    ``cfg.proximal_mu`` the loss adds FedProx's pull toward the received (starting) tensors.
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
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, cfg.local_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            loss = local_loss(model, _to_device(next(batches), device), cfg, counts)
            (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
        if anchors:  # the data loss is what is reported; the penalty only steers the step
            proximal_penalty(params, anchors, cfg.proximal_mu).backward()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training loss became {step_loss} at step {step}")
        optimizer.step()
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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], task: Task
) -> EvalResult:
    """Loss, perplexity and (classification) accuracy over one ordered pass of ``batches``."""
    device = next(model.parameters()).device
    model.eval()
    total_loss, total_tokens, correct, examples = 0.0, 0, 0, 0
    for batch in batches:
        batch = _to_device(batch, device)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        labels = batch["labels"]
        examples += int(labels.shape[0])
        if task == "classification":
            losses = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            total_loss += float(losses)
            total_tokens += int(labels.shape[0])
            correct += int((logits.argmax(-1) == labels).sum())
        else:
            # Shift so that tokens < n predict token n, as the model's own loss does.
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            mask = shift_labels != -100
            losses = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total_loss += float(losses)
            total_tokens += int(mask.sum())
    if total_tokens == 0:
        return EvalResult(math.nan, math.nan, None, examples, 0)
    mean = total_loss / total_tokens
    accuracy = correct / examples if task == "classification" else None
    return EvalResult(mean, math.exp(min(mean, 50.0)), accuracy, examples, total_tokens)
