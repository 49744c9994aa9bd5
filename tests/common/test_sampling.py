"""Cohort sampling: the size rule, and a seeded draw that depends on nothing but its inputs."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from common.config import RunConfig, config_from_dict, fewest_survivors, site_plan
from common.errors import ConfigError
from common.sampling import STAGE_EVALUATE, STAGE_TRAIN, cohort_size, draw_cohort

SITES = [f"site-{i}" for i in range(10)]


@pytest.mark.parametrize(
    ("fraction", "available", "min_sites", "expected"),
    [
        (1.0, 6, None, 6),  # no sampling: every site
        (0.5, 6, None, 3),
        (0.1, 100, None, 10),  # FlowerTune's 10 % of 100
        (0.1, 3, None, 1),  # round(0.3) = 0, but a stage instructs at least one site
        (0.5, 5, None, 2),  # Python's round: 2.5 -> 2 (half to even)
        (0.5, 7, None, 4),  # 3.5 -> 4
        (0.1, 100, 15, 15),  # never below federation.min-sites
        (0.1, 4, 15, 4),  # nor above the sites available
        (0.5, 0, None, 0),
    ],
)
def test_cohort_size(fraction: float, available: int, min_sites: int | None, expected: int) -> None:
    assert cohort_size(fraction, available, min_sites) == expected


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_cohort_size_refuses_a_fraction_outside_0_1(fraction: float) -> None:
    with pytest.raises(ConfigError, match="expected 0 < fraction <= 1"):
        cohort_size(fraction, 10)


def test_draw_is_seeded_and_independent_of_the_order_of_sites() -> None:
    first = draw_cohort(SITES, 3, 7, 4, STAGE_TRAIN)
    shuffled = [SITES[i] for i in (3, 9, 0, 5, 1, 8, 2, 7, 6, 4)]
    assert draw_cohort(shuffled, 3, 7, 4, STAGE_TRAIN) == first
    assert draw_cohort(tuple(reversed(SITES)), 3, 7, 4, STAGE_TRAIN) == first
    assert len(first) == 3 and set(first) <= set(SITES) and first == sorted(first)


def test_draw_is_the_lowest_sha256_ranks_a_known_answer() -> None:
    """The draw is documented as the sites of lowest SHA-256 rank: recompute it here."""

    def rank(site: str) -> bytes:
        return hashlib.sha256(f"fedlora/cohort/1|7|train|4|{site}".encode()).digest()

    assert draw_cohort(SITES, 4, 7, 4, STAGE_TRAIN) == sorted(sorted(SITES, key=rank)[:4])


def test_seed_round_and_stage_each_change_the_draw() -> None:
    base = {tuple(draw_cohort(SITES, 3, 0, r, STAGE_TRAIN)) for r in range(1, 21)}
    assert len(base) > 10  # rounds draw different cohorts
    other_seed = [draw_cohort(SITES, 3, 1, r, STAGE_TRAIN) for r in range(1, 21)]
    same = [draw_cohort(SITES, 3, 0, r, STAGE_TRAIN) for r in range(1, 21)]
    assert other_seed != same
    evaluate = [draw_cohort(SITES, 3, 0, r, STAGE_EVALUATE) for r in range(1, 21)]
    assert evaluate != same


def test_draw_is_about_uniform_over_sites() -> None:
    """2000 draws of 2 of 10: each site about 400 times (binomial sd ~18; 5 sd margin)."""
    counts = Counter(s for r in range(2000) for s in draw_cohort(SITES, 2, 3, r, STAGE_TRAIN))
    assert set(counts) == set(SITES)
    assert all(abs(n - 400) < 90 for n in counts.values()), counts


def test_draw_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="stage 'fit'"):
        draw_cohort(SITES, 2, 0, 1, "fit")
    with pytest.raises(ConfigError, match="site ids repeat"):
        draw_cohort(["site-0", "site-0", "site-1"], 2, 0, 1, STAGE_TRAIN)
    with pytest.raises(ConfigError, match="cohort size 11"):
        draw_cohort(SITES, 11, 0, 1, STAGE_TRAIN)


def _cfg(federation: dict[str, object], **extra: object) -> RunConfig:
    raw: dict[str, object] = {"model": {"name": "tiny-llama"}, "data": {}, "federation": federation}
    raw.update(extra)
    return config_from_dict(raw)


def test_defaults_do_not_sample() -> None:
    fed = _cfg({"sites": 6}).federation
    assert (fed.fraction_train, fed.fraction_evaluate, fed.min_available_sites) == (1.0, 1.0, None)
    assert not fed.samples
    assert fed.available_floor == 6 and fed.expected_train_cohort == 6


def test_cohorts_from_the_config() -> None:
    fed = _cfg({"sites": 100, "fraction-train": 0.1, "min-available-sites": 50}).federation
    assert fed.samples
    assert fed.expected_train_cohort == 10  # DP's fixed denominator
    assert fed.smallest_train_cohort == 5  # 10 % of the 50 the coordinator may start with


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        ({"fraction-train": 0}, "federation.fraction-train"),
        ({"fraction-train": 1.5}, "federation.fraction-train"),
        ({"fraction-evaluate": -0.5}, "federation.fraction-evaluate"),
        ({"min-available-sites": 0}, "federation.min-available-sites"),
        ({"sites": 4, "min-available-sites": 5}, "min-available-sites = 5 exceeds"),
        ({"sites": 6, "min-available-sites": 3, "min-sites": 4}, "expected min-sites <="),
    ],
)
def test_bad_sampling_keys_name_the_key(federation: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _cfg(federation)


def test_secure_sum_refuses_a_cohort_below_3() -> None:
    with pytest.raises(ConfigError, match="samples 2"):
        _cfg({"sites": 6, "fraction-train": 0.34}, privacy={"mode": "secure-sum"})
    _cfg({"sites": 6, "fraction-train": 0.5}, privacy={"mode": "secure-sum"})  # 3: fine


def test_distributed_noise_is_sized_for_the_smallest_cohort() -> None:
    """6 sites all connected: threshold 4; a sampled cohort of 3 has threshold 2, so each site
    must add sigma C / sqrt(2), not / sqrt(4): fewer sites must not mean less noise."""
    dp = {"enabled": True, "placement": "distributed", "noise-multiplier": 1.0, "clip": 1.0}
    privacy = {"mode": "secure-sum", "dp": dp}
    everyone = _cfg({"sites": 6}, privacy=privacy)
    sampled = _cfg({"sites": 6, "fraction-train": 0.5}, privacy=privacy)
    assert fewest_survivors(everyone) == 4
    assert fewest_survivors(sampled) == 2
    assert site_plan(sampled).site_noise_std == pytest.approx(1.0 / 2**0.5)
    assert site_plan(everyone).site_noise_std == pytest.approx(1.0 / 2.0)
