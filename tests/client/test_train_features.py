"""Known answers for the local step's lr schedule, warm-up, gradient clipping and accumulation.

A one-tensor model whose loss is linear or quadratic in its weight, trained with plain SGD
(lr 1, no momentum), so every step's change is the lr times the gradient the step used.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from client.train import train_local
from common.config import TrainConfig


class Linear(torch.nn.Module):
    """loss = <w, x>: the gradient is the batch's x, whatever w is."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=(self.w * x).sum())


class Quadratic(Linear):
    """loss = ||w - x||^2: the gradient is 2 (w - x)."""

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=((self.w - x) ** 2).sum())


def batches(*xs: list[float]) -> Iterator[dict[str, torch.Tensor]]:
    return itertools.cycle([{"x": torch.tensor(x)} for x in xs])


def sgd(**keys: object) -> TrainConfig:
    return TrainConfig.model_validate({"optimizer": "sgd", "momentum": 0.0, "lr": 1.0, **keys})


def steps_taken(cfg: TrainConfig, model: Linear, data: Iterator[dict[str, torch.Tensor]]) -> list:
    """w after each optimizer step."""
    seen: list[list[float]] = []
    train_local(model, data, cfg, seed=0, on_step=lambda *_: seen.append(model.w.tolist()))
    return seen


@pytest.mark.parametrize(
    ("scheduler", "lrs"),
    [
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", [0.0, 0.5, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.146446609]),
    ],
)
def test_schedule_with_warmup_sets_each_steps_lr(scheduler: str, lrs: list[float]) -> None:
    cfg = sgd(**{"local-steps": 6, "lr-scheduler": scheduler, "warmup-steps": 2})
    after = steps_taken(cfg, Linear(), batches([-1.0, 0.0, 0.0]))
    # The gradient is (-1, 0, 0) at every step: w[0] after step k is the sum of the lrs so far.
    assert [round(w[0], 6) for w in after] == [round(x, 6) for x in itertools.accumulate(lrs)]


def test_default_is_a_constant_lr_without_warmup() -> None:
    after = steps_taken(sgd(**{"local-steps": 3}), Linear(), batches([-1.0, 0.0, 0.0]))
    assert [w[0] for w in after] == [1.0, 2.0, 3.0]


def test_gradient_norm_is_clipped_before_the_step() -> None:
    # At w = 0 the gradient is 2 (0 - (3, 4, 0)) = (-6, -8, 0), norm 10.
    clipped = steps_taken(
        sgd(**{"local-steps": 1, "max-grad-norm": 0.5}), Quadratic(), batches([3.0, 4.0, 0.0])
    )
    assert clipped[0] == pytest.approx([0.3, 0.4, 0.0])
    plain = steps_taken(sgd(**{"local-steps": 1}), Quadratic(), batches([3.0, 4.0, 0.0]))
    assert plain[0] == pytest.approx([6.0, 8.0, 0.0])
    # A bound above the norm changes nothing.
    loose = steps_taken(
        sgd(**{"local-steps": 1, "max-grad-norm": 20.0}), Quadratic(), batches([3.0, 4.0, 0.0])
    )
    assert loose[0] == pytest.approx(plain[0])


def test_accumulation_averages_the_micro_batches_of_a_step() -> None:
    cfg = sgd(**{"local-steps": 1, "grad-accum": 2})
    after = steps_taken(cfg, Linear(), batches([-1.0, 0.0, 0.0], [-3.0, 2.0, 0.0]))
    assert after[0] == pytest.approx([2.0, -1.0, 0.0])  # - lr x the mean of the two gradients


def test_clipping_applies_to_the_accumulated_gradient() -> None:
    # Mean gradient (2, -1, 0) / accumulation, norm sqrt(5); clipped to 1.
    cfg = sgd(**{"local-steps": 1, "grad-accum": 2, "max-grad-norm": 1.0})
    after = steps_taken(cfg, Linear(), batches([-1.0, 0.0, 0.0], [-3.0, 2.0, 0.0]))
    assert after[0] == pytest.approx([2 / math.sqrt(5), -1 / math.sqrt(5), 0.0])


def test_warmup_must_leave_steps_to_train() -> None:
    with pytest.raises(ValidationError, match=r"warmup-steps = 5 must be below train\.local-steps"):
        TrainConfig.model_validate({"local-steps": 5, "warmup-steps": 5})
