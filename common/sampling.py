"""Which sites take part in a round: the cohort's size and a seeded, order-free draw.

``federation.fraction-train`` / ``fraction-evaluate`` name the share of the available sites a
stage instructs (Flower's ``fraction_train``, FlowerTune's 10 % of clients per round). The
draw is a pure function of the sampling seed, the round, the stage and the set of available
site ids: the same facts give the same cohort whatever order the sites connected or replied
in, and a resumed run (same config, same sites) draws the cohorts it would have drawn.

Each site's rank is SHA-256(domain | seed | stage | round | site id) and the cohort is the
``size`` sites of lowest rank: a uniformly random subset of that size (as far as SHA-256 is a
random function), fixed-size and without replacement, and the same on every Python version
(``random.sample`` promises no such thing).

The coordinator draws and therefore knows the cohort: the draw is not secret from it, so no
privacy amplification by sampling is claimed against it (``common.dp``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

from common.errors import ConfigError

_DOMAIN = "fedlora/cohort/1"
STAGE_TRAIN = "train"
STAGE_EVALUATE = "evaluate"
STAGES = (STAGE_TRAIN, STAGE_EVALUATE)


def cohort_size(fraction: float, available: int, min_sites: int | None = None) -> int:
    """Sites a stage instructs: ``max(1, round(fraction * available))``, never below
    ``min_sites`` (the fewest replies a round aggregates), never above ``available``.

    ``round`` is Python's (half to even): 0.5 of 5 sites is 2, of 7 sites 4.

    Raises
    ------
    ConfigError
        ``fraction`` outside (0, 1] or ``available`` negative.
    """
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"sampling fraction {fraction!r}: expected 0 < fraction <= 1")
    if available < 0:
        raise ConfigError(f"available sites {available}: expected a count >= 0")
    size = max(1, round(fraction * available), min_sites or 0)
    return min(size, available)


def _rank(seed: int, stage: str, server_round: int, site: str) -> bytes:
    text = f"{_DOMAIN}|{seed}|{stage}|{server_round}|{site}"
    return hashlib.sha256(text.encode("utf-8")).digest()


def draw_cohort(
    sites: Iterable[str], size: int, seed: int, server_round: int, stage: str
) -> list[str]:
    """The ``size`` sites of ``sites`` that ``stage`` of ``server_round`` instructs, sorted.

    A pure function of its arguments; the order of ``sites`` does not matter.

    Raises
    ------
    ConfigError
        An unknown ``stage``, a repeated site id, or ``size`` outside ``[0, len(sites)]``.
    """
    if stage not in STAGES:
        raise ConfigError(f"cohort stage {stage!r}: expected one of {STAGES}")
    pool = sorted(sites)
    if len(set(pool)) != len(pool):
        raise ConfigError(f"cohort draw: site ids repeat in {pool}")
    if not 0 <= size <= len(pool):
        raise ConfigError(f"cohort size {size}: expected 0 <= size <= {len(pool)} sites")
    ranked = sorted(pool, key=lambda site: _rank(seed, stage, server_round, site))
    return sorted(ranked[:size])
