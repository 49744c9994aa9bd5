"""Known answers for SCAFFOLD's local correction (client/drift.py).

A one-tensor model with a quadratic loss ``||w - x||^2`` (gradient ``2 (w - x)``), trained
with plain SGD, so every step can be written down by hand: the corrected step is
``w - lr (2 (w - x) + c - c_i)``, the site's new ``c_i`` is the mean of the raw gradients,
and for plain SGD that equals the paper's option II, ``c_i - c + (w0 - wK) / (K lr)``.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from client.drift import DriftCorrection, join_kept, split_kept
from client.train import train_local
from common.config import TrainConfig
from common.errors import UpdateRejected

KEY = "shared/w"


class Quadratic(torch.nn.Module):
    """loss = ||w - x||^2: the gradient is 2 (w - x)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=((self.w - x) ** 2).sum())


def _run(
    c: list[float], c_i: list[float] | None, lr: float = 0.25, steps: int = 3
) -> tuple[Quadratic, torch.Tensor, DriftCorrection, list[list[float]]]:
    model = Quadratic()
    x = torch.tensor([1.0, -2.0, 0.5])
    cfg = TrainConfig.model_validate(
        {"optimizer": "sgd", "momentum": 0.0, "lr": lr, "local-steps": steps}
    )
    own = {} if c_i is None else {KEY: torch.tensor(c_i)}
    drift = DriftCorrection({KEY: model.w}, {KEY: torch.tensor(c)}, own)
    seen: list[list[float]] = []
    train_local(
        model,
        itertools.repeat({"x": x}),
        cfg,
        seed=0,
        on_step=lambda *_: seen.append(model.w.tolist()),
        drift=drift,
    )
    return model, x, drift, seen


def test_every_step_adds_c_minus_c_i_to_the_raw_gradient() -> None:
    c, c_i, lr = [0.5, 0.0, -1.0], [0.25, 1.0, 0.0], 0.25
    _, x, _, seen = _run(c, c_i, lr)
    w = torch.zeros(3)
    correction = torch.tensor(c) - torch.tensor(c_i)
    for got in seen:
        w = w - lr * (2 * (w - x) + correction)
        assert got == pytest.approx(w.tolist(), abs=1e-6)


def test_new_c_i_is_the_mean_raw_gradient_and_option_two() -> None:
    c, c_i, lr, steps = [0.5, 0.0, -1.0], [0.25, 1.0, 0.0], 0.25, 3
    model, x, drift, seen = _run(c, c_i, lr, steps)
    points = [torch.zeros(3)] + [torch.tensor(p) for p in seen[:-1]]  # where each step began
    mean_grad = torch.stack([2 * (p - x) for p in points]).mean(dim=0)
    new_own = drift.new_own()[KEY]
    assert new_own.tolist() == pytest.approx(mean_grad.tolist(), abs=1e-6)
    option_two = torch.tensor(c_i) - torch.tensor(c) + (0 - model.w.detach()) / (steps * lr)
    assert new_own.tolist() == pytest.approx(option_two.tolist(), abs=1e-5)
    # What the site sends is the change of its own estimate.
    sent = drift.sent(drift.new_own())[KEY]
    assert sent.tolist() == pytest.approx((mean_grad - torch.tensor(c_i)).tolist(), abs=1e-6)


def test_first_round_without_estimates_is_plain_sgd() -> None:
    _, x, _, seen = _run([0.0, 0.0, 0.0], None)
    w = torch.zeros(3)
    for got in seen:
        w = w - 0.25 * 2 * (w - x)
        assert got == pytest.approx(w.tolist(), abs=1e-6)


def test_wrong_shape_or_unknown_key_is_refused() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UpdateRejected, match=r"shared/w: expected shape \(3,\), got \(2,\)"):
        DriftCorrection({KEY: w}, {KEY: torch.zeros(2)}, {})
    with pytest.raises(UpdateRejected, match="does not train"):
        DriftCorrection({KEY: w}, {"shared/other": torch.zeros(3)}, {})


def test_kept_round_trip_keeps_the_estimate_apart_from_module_tensors() -> None:
    kept = {"private/a": torch.ones(2)}
    own = {KEY: torch.full((3,), 2.0)}
    rest, back = split_kept(join_kept(kept, own))
    assert set(rest) == {"private/a"} and torch.equal(back[KEY], own[KEY])
