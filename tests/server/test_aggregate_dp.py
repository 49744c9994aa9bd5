"""Central DP at the coordinator, observed on the new global state it publishes.

Checks the mechanism, not the accountant: the published mean differs from the exact mean of
the clipped deltas by Gaussian noise of std ``sigma * C / N`` (N the fixed denominator), and a
site that skipped its own clipping moves the mean by at most ``C / N``.

False-failure rate: a sample std over n = 100,000 normal draws is checked to within 6 of its
standard errors (``1 / sqrt(2 n)`` relative), which fails a correct run with probability about
2e-9; single coordinates are checked to within 6 noise stds (about 2e-9 each).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.config import load_config
from server.aggregate import Aggregator, SiteDelta

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.toml"
SIGMA, CLIP, SITES = 0.7, 0.25, 4
A, B = "shared/m.lora_A.weight", "shared/m.lora_B.weight"
SHAPE = (250, 200)  # 50,000 coordinates per tensor, 100,000 per delta


def _aggregator(dp: bool = True) -> Aggregator:
    overrides = [f"federation.sites={SITES}"]
    if dp:
        overrides += [
            "privacy.dp.enabled=true",
            f"privacy.dp.clip={CLIP}",
            f"privacy.dp.noise-multiplier={SIGMA}",
        ]
    return Aggregator(load_config(TINY, overrides))


def _global() -> dict[str, torch.Tensor]:
    return {A: torch.zeros(SHAPE), B: torch.zeros(SHAPE)}


def _deltas(seed: int) -> list[SiteDelta]:
    """SITES small deltas (norm well under C): clipping leaves them as they are."""
    generator = torch.Generator().manual_seed(seed)
    scale = CLIP / (4 * math.sqrt(2 * SHAPE[0] * SHAPE[1]))
    return [
        SiteDelta(
            f"site-{i}",
            10,
            {key: torch.randn(SHAPE, generator=generator) * scale for key in (A, B)},
        )
        for i in range(SITES)
    ]


def _residual(new: dict[str, torch.Tensor], deltas: list[SiteDelta]) -> torch.Tensor:
    exact = {k: sum(d.delta[k].double() for d in deltas) / SITES for k in (A, B)}
    return torch.cat([(new[k].double() - exact[k]).flatten() for k in (A, B)])


def test_the_published_mean_carries_noise_of_std_sigma_c_over_n() -> None:
    deltas = _deltas(0)
    new = _aggregator().aggregate(_global(), deltas, server_round=1, version=0)
    residual = _residual(new, deltas)
    expected = SIGMA * CLIP / SITES
    n = residual.numel()
    assert abs(residual.mean().item()) <= 6 * expected / math.sqrt(n)
    assert abs(residual.std().item() / expected - 1.0) <= 6 / math.sqrt(2 * n)


def test_without_dp_the_mean_is_exact() -> None:  # the residual above is the noise, nothing else
    deltas = _deltas(1)
    new = _aggregator(dp=False).aggregate(_global(), deltas, server_round=1, version=0)
    assert _residual(new, deltas).abs().max().item() < 1e-6


@pytest.mark.parametrize("size", [10.0, 1e4])
def test_a_site_that_skipped_clipping_moves_the_mean_by_at_most_c_over_n(size: float) -> None:
    deltas = _deltas(2)
    zero = {k: torch.zeros(SHAPE) for k in (A, B)}
    spike = {A: zero[A].clone(), B: zero[B]}
    spike[A][0, 0] = size * CLIP  # one coordinate, far beyond the norm bound
    rogue = SiteDelta("site-0", 10, spike)
    new = _aggregator().aggregate(_global(), [rogue, *deltas[1:]], server_round=1, version=0)
    others = sum(d.delta[A][0, 0].item() for d in deltas[1:])
    # Clipped to C, the rogue adds C / N at that coordinate, plus the noise there.
    assert abs(new[A][0, 0].item() - (CLIP + others) / SITES) <= 6 * SIGMA * CLIP / SITES
