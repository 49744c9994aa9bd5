"""Known-answer tests for the skew-robust local losses (client.losses), against float64 numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from client.losses import (
    calibrated_cross_entropy,
    label_counts,
    proximal_penalty,
    restricted_cross_entropy,
)
from common.errors import ConfigError

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 1.0, -2.0, 4.0]])
LABELS = torch.tensor([0, 2])
COUNTS = torch.tensor([3.0, 0.0, 1.0, 0.0])  # the site holds labels 0 and 2 only


def _reference(logits: np.ndarray, labels: list[int], keep: list[int], shift: np.ndarray) -> float:
    """Mean of -log softmax over the ``keep`` columns of ``logits - shift``, in float64."""
    total = 0.0
    for row, label in zip(logits.astype(np.float64) - shift, labels, strict=True):
        kept = row[keep]
        total += -(row[label] - math.log(np.exp(kept).sum()))
    return total / len(labels)


def test_label_counts_counts_each_id_and_refuses_foreign_ids() -> None:
    assert label_counts([0, 2, 0, 0], 4).tolist() == [3.0, 0.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="label id 5 is outside the run's 4 labels"):
        label_counts([5], 4)


def test_restricted_softmax_is_cross_entropy_over_the_sites_labels() -> None:
    got = float(restricted_cross_entropy(LOGITS, LABELS, COUNTS))
    want = _reference(LOGITS.numpy(), [0, 2], [0, 2], np.zeros(4))
    assert got == pytest.approx(want, rel=1e-6)
    # Label 3 has the largest logits, yet it is absent here: the plain loss is much larger.
    plain = float(torch.nn.functional.cross_entropy(LOGITS, LABELS))
    assert plain > got + 1.0


def test_restricted_softmax_gives_absent_labels_no_gradient() -> None:
    weight = torch.randn(4, 3, requires_grad=True, generator=torch.Generator().manual_seed(0))
    features = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    restricted_cross_entropy(features @ weight.T, LABELS, COUNTS).backward()
    assert weight.grad is not None
    assert torch.all(weight.grad[[1, 3]] == 0)  # the rows of the labels this site lacks
    assert torch.all(weight.grad[[0, 2]].abs().sum(dim=1) > 0)
    weight.grad = None
    torch.nn.functional.cross_entropy(features @ weight.T, LABELS).backward()
    assert weight.grad is not None and torch.all(weight.grad[[1, 3]].abs().sum(dim=1) > 0)


def test_calibrated_softmax_shifts_logits_by_tau_over_fourth_root_of_counts() -> None:
    got = float(calibrated_cross_entropy(LOGITS, LABELS, COUNTS, tau=0.7))
    shift = np.array([0.7 * 3.0**-0.25, 0.0, 0.7 * 1.0**-0.25, 0.0])
    assert got == pytest.approx(_reference(LOGITS.numpy(), [0, 2], [0, 2], shift), rel=1e-6)
    # tau = 0 is the restricted softmax; balanced counts move every logit alike (no effect).
    assert float(calibrated_cross_entropy(LOGITS, LABELS, COUNTS, tau=0.0)) == pytest.approx(
        float(restricted_cross_entropy(LOGITS, LABELS, COUNTS))
    )
    even = torch.full((4,), 5.0)
    assert float(calibrated_cross_entropy(LOGITS, LABELS, even, tau=2.0)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(LOGITS, LABELS))
    )


def test_proximal_penalty_is_half_mu_squared_distance() -> None:
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    anchors = [torch.tensor([0.0, 0.0]), torch.tensor([[1.5]])]
    # (1 + 4 + 1) * 0.1 / 2
    assert float(proximal_penalty(params, anchors, mu=0.1)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="2 parameters but 1 anchors"):
        proximal_penalty(params, anchors[:1], mu=0.1)
