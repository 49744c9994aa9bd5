"""The coordinator's check of an unmasked secure sum (``server.secure_sum.check_sum_bounds``)."""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg import SecAggError, params_for
from common.secagg_server import SecAggResult
from server.secure_sum import check_sum_bounds

PARAMS = params_for(3, 1.0, 100.0)  # clip-range 1, max-weight 100


def _result(values: list[float], weight: float, survivors: int = 3) -> SecAggResult:
    return SecAggResult(
        np.array(values, np.float64), weight, tuple(range(1, survivors + 1)), (), {}
    )


def test_sums_honest_inputs_can_make_pass() -> None:
    check_sum_bounds(_result([0.0, -3.0, 299.9], 300.0), PARAMS)  # every site at its bounds
    check_sum_bounds(_result([0.5, -2.0], 3.0), PARAMS)  # three sites of weight 1 (DP)


@pytest.mark.parametrize("weight", [2.0, 301.0, -5.0, float("nan")])
def test_impossible_total_weight_is_refused(weight: float) -> None:
    with pytest.raises(SecAggError, match="total weight"):
        check_sum_bounds(_result([0.0], weight), PARAMS)


@pytest.mark.parametrize("value", [3.01, -50.0, float("nan")])
def test_coordinate_above_weight_times_clip_range_is_refused(value: float) -> None:
    with pytest.raises(SecAggError, match="coordinate"):
        check_sum_bounds(_result([0.0, value], 3.0), PARAMS)
