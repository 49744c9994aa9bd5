"""Robust aggregation: known answers against numpy, and bounded influence of outliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.adapters import AggregationError
from common.robust import aggregate_median, aggregate_trimmed_mean


def _deltas(values: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
    return [{"a.lora_A.weight": torch.tensor(v, dtype=torch.float32)} for v in values]


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    values = [rng.normal(size=(3, 4)) for _ in range(n)]
    result = aggregate_median(_deltas(values))["a.lora_A.weight"]
    np.testing.assert_allclose(result.numpy(), np.median(np.stack(values), axis=0), rtol=1e-6)


def test_trimmed_mean_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    values = np.stack([rng.normal(size=(5,)) for _ in range(10)])
    result = aggregate_trimmed_mean(_deltas(list(values)), 0.2)["a.lora_A.weight"]
    expected = np.sort(values, axis=0)[2:8].mean(axis=0)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6)


def test_one_hostile_site_barely_moves_the_median() -> None:
    honest = [np.full((4,), 0.01 * i) for i in range(4)]
    hostile = np.full((4,), 1e6)
    median = aggregate_median(_deltas([*honest, hostile]))["a.lora_A.weight"]
    trimmed = aggregate_trimmed_mean(_deltas([*honest, hostile]), 0.2)["a.lora_A.weight"]
    assert float(median.abs().max()) <= 0.03
    assert float(trimmed.abs().max()) <= 0.03


def test_bad_inputs() -> None:
    with pytest.raises(AggregationError):
        aggregate_median([])
    with pytest.raises(AggregationError):
        aggregate_trimmed_mean(_deltas([np.zeros(2)]), 0.5)
