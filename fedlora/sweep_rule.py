"""``fedlora sweep``'s recommendation: the cheapest setting whose federated quality is close
enough to the best one's. Pure: no model, no files, so that the rule is tested on a known table.

Quality is accuracy (a fraction, higher is better) for classification and perplexity (lower is
better) for a causal LM. The tolerance is in accuracy points (1.0 = 0.01 accuracy) or in
percent of the best perplexity (2.0 = within 2 % above it). Cheapest = fewest bytes per round
(up + down, all sites), then fewest trainable parameters, then the earlier row. A setting whose
quality is not finite (a learning rate that diverged: perplexity inf or nan) is never the best
nor recommended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_ACCURACY_POINTS = 1.0
DEFAULT_PERPLEXITY_PERCENT = 2.0
# Float slack: 0.80 - 0.01 is 0.79000000000000004, and 0.79 must still count as within.
_SLACK = 1e-9


@dataclass(frozen=True)
class Candidate:
    """One sweep row as the rule sees it."""

    label: str
    quality: float
    bytes_per_round: float
    trainable_parameters: int


@dataclass(frozen=True)
class Recommendation:
    index: int
    label: str
    reason: str


def default_tolerance(classification: bool) -> float:
    """1 accuracy point, or 2 % of the best perplexity."""
    return DEFAULT_ACCURACY_POINTS if classification else DEFAULT_PERPLEXITY_PERCENT


def within_tolerance(quality: float, best: float, classification: bool, tolerance: float) -> bool:
    """Whether ``quality`` is at most ``tolerance`` points (percent) worse than ``best``."""
    if classification:
        return quality >= best - tolerance / 100 - _SLACK
    return quality <= best * (1 + tolerance / 100) + _SLACK


def recommend(
    rows: Sequence[Candidate], classification: bool, tolerance: float | None = None
) -> Recommendation | None:
    """The cheapest row within ``tolerance`` of the best federated quality, and why; None
    where no row has a finite quality.

    Raises ValueError on an empty table or a negative tolerance.
    """
    if not rows:
        raise ValueError("recommend: no rows")
    tol = default_tolerance(classification) if tolerance is None else tolerance
    if tol < 0:
        raise ValueError(f"recommend: tolerance {tol} is negative")
    finite = [i for i, row in enumerate(rows) if math.isfinite(row.quality)]
    if not finite:
        return None
    pick_best = max if classification else min
    best = pick_best(finite, key=lambda i: rows[i].quality)
    close = [
        i for i in finite
        if within_tolerance(rows[i].quality, rows[best].quality, classification, tol)
    ]  # fmt: skip
    index = min(close, key=lambda i: (rows[i].bytes_per_round, rows[i].trainable_parameters, i))
    chosen = rows[index]
    unit = "accuracy points" if classification else "% perplexity"
    shown = (lambda q: f"{100 * q:.1f}%") if classification else (lambda q: f"{q:.3f}")
    if index == best:
        why = "it has the best federated quality" + (
            " and is the cheapest of the settings within tolerance" if len(close) > 1 else ""
        )
    else:
        why = (
            f"its federated quality {shown(chosen.quality)} is within {tol:g} {unit} of the "
            f"best ({shown(rows[best].quality)}, {rows[best].label})"
        )
    reason = (
        f"{chosen.label}: {why}, at {chosen.bytes_per_round:,.0f} bytes per round and "
        f"{chosen.trainable_parameters:,} trainable parameters, the fewest of the "
        f"{len(close)} setting(s) within {tol:g} {unit} of the best."
    )
    return Recommendation(index, chosen.label, reason)
