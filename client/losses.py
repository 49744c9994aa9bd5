"""Local objectives that survive label skew and client drift: pure functions on tensors.

When every site holds its own few labels, the plain softmax cross-entropy at a site pushes
down the logit of every label the site has never seen. Averaged over sites, those pushes
cancel the pulls of the sites that do hold each label, and the global classifier learns a
near-uniform distribution (the failure measured in ``benchmarks/RESULTS.md``). The fixes here
act on the local loss alone, so they work with every aggregation rule and privacy mode, and a
site's label list never leaves it:

``restricted``
    Softmax over the site's own labels only (FedRS, Li & Zhan 2021, with alpha = 0): a label
    with no example at the site gets no gradient at all, neither its head row nor the
    features that would separate it.
``calibrated``
    Logit calibration by the site's label counts (FedLC, Zhang et al. 2022):
    ``z_c - tau * n_c ** -0.25``; a rare label's logit is lowered during training so that the
    model must raise it more, and an absent label (``n_c = 0``) drops out as in ``restricted``.
``proximal_penalty``
    FedProx's ``mu / 2 * ||w - w_global||^2`` over the trained tensors: keeps each site's
    local steps near the global point it started from (client drift).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional

from common.errors import ConfigError


def label_counts(labels: Sequence[int], num_labels: int) -> torch.Tensor:
    """How many examples of each label id in ``[0, num_labels)`` a site holds (float32)."""
    counts = torch.zeros(num_labels, dtype=torch.float32)
    for label in labels:
        if not 0 <= label < num_labels:
            raise ConfigError(f"label id {label} is outside the run's {num_labels} labels")
        counts[label] += 1
    return counts


def restricted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, alpha: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (batch x labels) with absent labels restricted.

    The logits of labels the site has no example of (``counts == 0``) are scaled by ``alpha``
    (FedRS); ``alpha = 0`` masks them out of the softmax (-inf), so they get no gradient.
    Every target label must be present (count > 0).
    """
    present = counts.to(logits.device) > 0
    if alpha > 0:
        return functional.cross_entropy(torch.where(present, logits, alpha * logits), labels)
    return functional.cross_entropy(logits.masked_fill(~present, float("-inf")), labels)


def calibrated_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, tau: float
) -> torch.Tensor:
    """FedLC: mean cross-entropy of ``logits - tau * counts ** -0.25`` (absent labels masked).

    ``counts`` are the site's examples per label; with ``tau = 0`` this is the restricted
    softmax, and on a balanced site every logit moves by the same amount (no effect).
    """
    counts = counts.to(logits.device, logits.dtype)
    present = counts > 0
    shift = tau * counts.clamp(min=1.0).pow(-0.25)
    calibrated = (logits - shift).masked_fill(~present, float("-inf"))
    return functional.cross_entropy(calibrated, labels)


def proximal_penalty(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx: ``mu / 2 * sum ||p - a||^2`` over matching trained tensors and their anchors."""
    if len(params) != len(anchors):
        raise ValueError(f"{len(params)} parameters but {len(anchors)} anchors")
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    return 0.5 * mu * torch.as_tensor(total)
