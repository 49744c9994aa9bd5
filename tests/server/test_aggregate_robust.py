"""Robust aggregation through the coordinator's Aggregator: known answers that differ from FedAvg.

Five sites send one-coordinate-per-tensor deltas with values 0, 1, 2, 6 and 100 (equal example
counts). Each robust setting has its own answer, so replacing it with FedAvg (21.8) fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import load_config
from server.aggregate import Aggregator, SiteDelta

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.toml"
A, B = "shared/m.lora_A.weight", "shared/m.lora_B.weight"
VALUES = (0.0, 1.0, 2.0, 6.0, 100.0)


def _new_a(*overrides: str, examples: tuple[int, ...] = (10,) * 5) -> float:
    aggregator = Aggregator(load_config(TINY, ["federation.sites=5", *overrides]))
    updates = [
        SiteDelta(f"site-{i}", n, {A: torch.full((1, 1), v), B: torch.zeros(1, 1)})
        for i, (v, n) in enumerate(zip(VALUES, examples, strict=True))
    ]
    glob = {A: torch.zeros(1, 1), B: torch.zeros(1, 1)}
    return aggregator.aggregate(glob, updates, server_round=1, version=0)[A].item()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), 21.8),  # FedAvg: (0 + 1 + 2 + 6 + 100) / 5
        (("aggregation.robust='median'",), 2.0),
        (("aggregation.robust='trimmed-mean'", "aggregation.trim-fraction=0.2"), 3.0),  # 1,2,6
        (("aggregation.server-clip=1.5",), (0 + 1 + 1.5 + 1.5 + 1.5) / 5),  # each delta's norm
        (("aggregation.robust='median'", "aggregation.server-clip=1.5"), 1.5),
    ],
    ids=["fedavg", "median", "trimmed-mean", "server-clip", "median+server-clip"],
)
def test_robust_aggregation_known_answers(overrides: tuple[str, ...], expected: float) -> None:
    assert _new_a(*overrides) == pytest.approx(expected, rel=1e-6)


def test_median_ignores_example_counts_fedavg_weighs_them() -> None:
    counts = (1, 1, 1, 1, 96)
    assert _new_a(examples=counts) == pytest.approx((0 + 1 + 2 + 6 + 96 * 100) / 100, rel=1e-6)
    assert _new_a("aggregation.robust='median'", examples=counts) == pytest.approx(2.0)
