"""Unit tests of fedlora.compare_curves: which rounds are evaluated, the federated curve from
metrics lines, the first round at a share of centralized, and the PNGs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.compare_curves import (
    CurvePoint,
    best_point,
    curve_rounds,
    curves_json,
    federated_curve,
    plot_curves,
    rounds_to_reach,
)


@pytest.mark.parametrize(
    ("rounds", "points", "expected"),
    [(10, 10, list(range(1, 11))), (50, 10, [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]),
     (7, 3, [3, 6, 7]), (2, 10, [1, 2]), (1, 5, [1])],
)  # fmt: skip
def test_curve_rounds_spread_evenly_and_end_at_the_last(
    rounds: int, points: int, expected: list[int]
) -> None:
    assert curve_rounds(rounds, points) == expected


def test_federated_curve_prefers_the_coordinators_global_figure() -> None:
    lines = [
        {"round": 1, "eval_accuracy": 0.3, "global_eval_accuracy": 0.2, "bytes_up": 5,
         "bytes_down": 7},
        {"round": 0, "eval_accuracy": 0.1, "bytes_up": 0, "bytes_down": 3},
        {"round": 2, "eval_accuracy": None, "global_eval_accuracy": float("nan"),
         "bytes_up": 5, "bytes_down": 7},
    ]  # fmt: skip
    points = federated_curve(lines, classification=True)
    assert points == [
        CurvePoint(0, 0.1, 0.1, 3),  # no coordinator figure: the sites' pooled held-out
        CurvePoint(1, 0.2, 0.3, 15),
        CurvePoint(2, None, None, 27),  # non-finite figures are no figures
    ]
    assert curves_json({"federated": points})["federated"][1] == {
        "round": 1, "global": 0.2, "own": 0.3, "bytes": 15
    }  # fmt: skip


def test_rounds_to_reach_accuracy_and_perplexity() -> None:
    accuracy = [CurvePoint(1, 0.5, None), CurvePoint(2, None, None), CurvePoint(3, 0.86, None),
                CurvePoint(4, 0.9, None)]  # fmt: skip
    assert rounds_to_reach(accuracy, 0.9, 0.95, higher_is_better=True) == 3  # 0.86 >= 0.855
    assert rounds_to_reach(accuracy, 0.9, 1.0, higher_is_better=True) == 4
    assert rounds_to_reach(accuracy, 0.99, 0.95, higher_is_better=True) is None
    perplexity = [CurvePoint(1, 12.0, None), CurvePoint(2, 10.4, None)]
    # centralized 10.0: round 2 is at 10.0 / 10.4 = 96 %, round 1 at 83 %.
    assert rounds_to_reach(perplexity, 10.0, 0.95, higher_is_better=False) == 2
    assert rounds_to_reach(perplexity, 10.0, 0.97, higher_is_better=False) is None


def test_plot_curves_writes_both_pngs(tmp_path: Path) -> None:
    curves = {
        "federated": [CurvePoint(0, 0.1, 0.1, 10), CurvePoint(1, 0.5, 0.6, 20)],
        "local-only": [CurvePoint(1, 0.2, 0.9, 0)],
    }
    paths = plot_curves(curves, tmp_path, classification=True)
    assert sorted(paths) == ["bytes", "round"]
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_point_is_the_best_global_figure_not_the_last() -> None:
    # A centralized run that diverges late (as AdamW at lr 5e-3 did on banking77).
    points = [CurvePoint(5, 0.66, None), CurvePoint(40, 0.79, None), CurvePoint(45, 0.01, None),
              CurvePoint(50, None, None)]  # fmt: skip
    assert best_point(points, higher_is_better=True) == points[1]
    assert best_point(points, higher_is_better=False) == points[2]
    assert best_point([CurvePoint(1, None, None)], higher_is_better=True) is None
