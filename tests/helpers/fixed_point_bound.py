"""The secure-sum error bound, derived in the tests from the fixed-point design, not read from
the code under test (``common.secagg.max_abs_error_per_coordinate`` or the
``secure_sum_max_abs_error`` a run reports): a tolerance the code reports passes however
large it says it is.

The design: N sites at weight W sending coordinates in [-C, C] must sum within the int32
range without wrapping, so one fixed-point level is ``N * W * C / (2**31 - 1)`` in sum units,
and each site rounds its weighted value to the nearest level (at most half a level off; a
whole level with stochastic rounding).
"""

from __future__ import annotations

INT32_MAX = 2**31 - 1


def sum_error_bound(
    num_sites: int, max_weight: float, clip: float, summed: int, stochastic: bool = False
) -> float:
    """Largest ``|decoded sum - exact sum|`` of one coordinate over ``summed`` sites.

    ``(1 + 1e-6)`` covers the integer division in the scale; ``2**-50`` of the largest value
    per site covers float64 rounding in weighting and decoding.
    """
    level = num_sites * max_weight * clip / INT32_MAX
    per_site = level * (1.0 if stochastic else 0.5) * (1 + 1e-6)
    return summed * (per_site + max_weight * clip * 2.0**-50)


def mean_error_bound(num_sites: int, max_weight: float, clip: float, summed: int) -> float:
    """Largest error of one coordinate of the weighted mean: the sum's error over a total
    weight of at least ``summed`` (every site weighs at least one example)."""
    return sum_error_bound(num_sites, max_weight, clip, summed) / summed
