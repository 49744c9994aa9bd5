"""Robust aggregation: known answers against numpy, and bounded influence of outliers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from common.adapters import AggregationError
from common.errors import UpdateRejected
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
    with pytest.raises(AggregationError, match=r"^no deltas to aggregate: "):
        aggregate_median([])
    with pytest.raises(AggregationError, match=r"^trim fraction 0\.5 outside \[0, 0\.5\)"):
        aggregate_trimmed_mean(_deltas([np.zeros(2)]), 0.5)


@pytest.mark.parametrize("rule", [aggregate_median, lambda d: aggregate_trimmed_mean(d, 0.0)])
def test_second_delta_of_another_shape_is_refused_naming_the_key(rule: Any) -> None:
    # Two deltas only: the second is the one checked against the first (mutation testing).
    deltas = _deltas([np.zeros(4), np.zeros(5)])
    with pytest.raises(UpdateRejected, match=r"a\.lora_A\.weight"):
        rule(deltas)


def test_trim_fraction_zero_is_the_plain_mean_and_one_delta_is_itself() -> None:
    values = [np.array([1.0, 2.0]), np.array([3.0, 10.0])]
    plain = aggregate_trimmed_mean(_deltas(values), 0.0)["a.lora_A.weight"]
    np.testing.assert_array_equal(plain.numpy(), [2.0, 6.0])
    single = aggregate_trimmed_mean(_deltas(values[:1]), 0.2)["a.lora_A.weight"]
    np.testing.assert_array_equal(single.numpy(), values[0])


@pytest.mark.parametrize("rule", [aggregate_median, lambda d: aggregate_trimmed_mean(d, 0.0)])
def test_sums_are_taken_in_float64_and_the_result_is_float32(rule: Any) -> None:
    # 3e38 + 3e38 overflows float32 (max 3.4e38) but not float64: a float32 sum gives inf.
    result = rule(_deltas([np.full((3,), 3e38), np.full((3,), 3e38)]))["a.lora_A.weight"]
    assert result.dtype == torch.float32
    np.testing.assert_array_equal(result.numpy(), np.full((3,), 3e38, dtype=np.float32))
