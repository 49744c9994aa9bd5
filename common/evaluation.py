"""Evaluation of an adapter on a data set: loss, perplexity and accuracy over one ordered pass.

A site measures each global version on its held-out split; the coordinator measures the shared
modules on the run's global evaluation set; ``fedlora compare`` measures every arm. All of them
evaluate here, so the figures mean the same everywhere. No Flower, no peft: ``model`` is any
torch module that returns logits (a peft model, or a plain transformers one).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from common.config import Task
from common.tokens import Encoded, eval_batches

# Eval batches are forward-only, so they can be larger than training batches.
EVAL_BATCH_SIZE = 16


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean loss per target token (causal LM) or per example (classification)
    perplexity: float
    accuracy: float | None  # classification only
    examples: int
    tokens: int  # target tokens (causal LM) or examples (classification) the loss averages over


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate_encoded(
    model: torch.nn.Module, items: list[Encoded], task: Task, pad_token_id: int
) -> EvalResult:
    """``evaluate`` over encoded examples (``common.tokens.encode_examples``), in their order,
    in batches of ``EVAL_BATCH_SIZE``."""
    return evaluate(model, eval_batches(items, EVAL_BATCH_SIZE, pad_token_id), task)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], task: Task
) -> EvalResult:
    """Loss, perplexity and (classification) accuracy over one ordered pass of ``batches``."""
    device = next(model.parameters()).device
    model.eval()
    total_loss, total_tokens, correct, examples = 0.0, 0, 0, 0
    for batch in batches:
        batch = to_device(batch, device)
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
