"""Robust aggregation for federations whose sites are not all trusted (sealed or plain mode).

Coordinate-wise median and trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed
Learning") bound the influence of a few hostile deltas on each coordinate; neither is a sum,
so neither works under secure aggregation. Pure functions on ``dict[str, Tensor]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from common.adapters import AdapterState, AggregationError, check_delta


def _stacked(deltas: Sequence[AdapterState], key: str) -> torch.Tensor:
    return torch.stack([d[key].detach().to(torch.float64) for d in deltas])


def _check(deltas: Sequence[AdapterState]) -> None:
    if not deltas:
        raise AggregationError("no deltas to aggregate: the round has no accepted replies")
    for delta in deltas[1:]:
        check_delta(delta, deltas[0])


def aggregate_median(deltas: Sequence[AdapterState]) -> AdapterState:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    _check(deltas)
    out: AdapterState = {}
    for key in deltas[0]:
        values = _stacked(deltas, key).sort(dim=0).values
        n = values.shape[0]
        middle = (values[(n - 1) // 2] + values[n // 2]) / 2
        out[key] = middle.to(torch.float32)
    return out


def aggregate_trimmed_mean(deltas: Sequence[AdapterState], trim_fraction: float) -> AdapterState:
    """Coordinate-wise mean after dropping the ``floor(trim_fraction * n)`` largest and smallest
    values of each coordinate (``trim_fraction`` in [0, 0.5))."""
    if not 0 <= trim_fraction < 0.5:
        raise AggregationError(f"trim fraction {trim_fraction} outside [0, 0.5)")
    _check(deltas)
    cut = math.floor(trim_fraction * len(deltas))
    out: AdapterState = {}
    for key in deltas[0]:
        values = _stacked(deltas, key).sort(dim=0).values
        kept = values[cut : values.shape[0] - cut]
        out[key] = kept.mean(dim=0).to(torch.float32)
    return out
