"""Known-answer and negative tests for common.fixedpoint (levels mod 2**32, flatten)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.fixedpoint import (
    MAX_SUM_LEVEL,
    FixedPointError,
    dequantize_sum,
    flatten,
    layout_size,
    max_level,
    quantize,
    unflatten,
)


def test_nearest_known_answer_two_complement() -> None:
    levels = quantize(np.array([0.0, 0.26, -0.26, 1.0, -1.0, 0.5]), scale=4.0, level_bound=100)
    # 0.26*4 = 1.04 -> 1; -1.04 -> -1 stored as 2**32 - 1; 0.5*4 = 2 exactly.
    assert levels.dtype == np.uint32
    assert levels.tolist() == [0, 1, 2**32 - 1, 4, 2**32 - 4, 2]


def test_levels_clip_to_bound() -> None:
    levels = quantize(np.array([10.0, -10.0]), scale=4.0, level_bound=7)
    assert levels.view(np.int32).tolist() == [7, -7]


def test_sum_wraps_and_decodes() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, size=(5, 1000))
    scale = 1000.0
    total = np.zeros(1000, dtype=np.uint32)
    for row in values:
        total += quantize(row, scale, max_level(1.0, scale))
    decoded = dequantize_sum(total, scale)
    assert np.abs(decoded - values.sum(axis=0)).max() <= 5 * 0.5 / scale + 1e-12


def test_sum_at_the_overflow_edge_decodes() -> None:
    # 2 sites at the largest allowed level: the sum is exactly 2**31 - 1 (no wrap-around).
    bound = MAX_SUM_LEVEL // 2
    total = quantize(np.array([3e9]), 1.0, bound) + quantize(np.array([3e9]), 1.0, bound)
    assert dequantize_sum(total, 1.0)[0] == 2 * bound


def test_stochastic_rounding_is_unbiased_and_bounded() -> None:
    rng = np.random.default_rng(1)
    values = np.full(200_000, 0.3)
    levels = quantize(values, 1.0, 10, rounding="stochastic", rng=rng).view(np.int32)
    assert set(levels.tolist()) == {0, 1}
    assert abs(levels.mean() - 0.3) < 0.01


@pytest.mark.parametrize(
    "values",
    [np.array([np.nan]), np.array([np.inf]), np.zeros((2, 2))],
    ids=["nan", "inf", "2d"],
)
def test_quantize_rejects_bad_values(values: np.ndarray) -> None:
    with pytest.raises(FixedPointError):
        quantize(values, 1.0, 10)


def test_quantize_rejects_level_bound_beyond_int32() -> None:
    with pytest.raises(FixedPointError, match="level bound"):
        quantize(np.zeros(1), 1.0, MAX_SUM_LEVEL + 1)


def test_quantize_rejects_unknown_rounding() -> None:
    with pytest.raises(FixedPointError, match="rounding"):
        quantize(np.zeros(1), 1.0, 10, rounding="floor")  # type: ignore[arg-type]


def test_dequantize_rejects_wrong_dtype() -> None:
    with pytest.raises(FixedPointError, match="uint32"):
        dequantize_sum(np.zeros(3, dtype=np.int64), 1.0)


def test_flatten_roundtrip_sorted_by_name() -> None:
    gen = torch.Generator().manual_seed(0)
    state = {
        "b.lora_B": torch.randn(3, 2, generator=gen),
        "a.lora_A": torch.randn(2, 3, generator=gen),
    }
    vector, layout = flatten(state)
    assert vector.dtype == np.float32
    assert [name for name, _ in layout] == ["a.lora_A", "b.lora_B"]
    assert layout_size(layout) == vector.shape[0] == 12
    back = unflatten(vector, layout)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor)


def test_flatten_rejects_integer_tensor() -> None:
    with pytest.raises(FixedPointError, match="dtype"):
        flatten({"x": torch.zeros(2, dtype=torch.int64)})


def test_unflatten_rejects_wrong_length() -> None:
    with pytest.raises(FixedPointError, match="layout expects 6"):
        unflatten(np.zeros(5), (("x", (2, 3)),))
