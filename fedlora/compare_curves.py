"""Per-round curves of ``fedlora compare``'s arms, and how many rounds the federation needs.

A curve is one arm's quality after each evaluated round: the global figure (accuracy, or
perplexity for a causal LM), the mean own held-out figure, and the bytes the arm had moved by
then. The federated curve comes from the run's ``metrics.jsonl`` (every round); the in-process
arms (local-only, centralized, personalized) are evaluated every ``stride`` rounds, since each
evaluation of local-only costs one pass over the global set per site.

``rounds_to_reach`` answers the pilot's question "after how many rounds is the federation at
90 % (95 %) of centralized?"; the plots are drawn with matplotlib's Agg canvas, no pyplot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedlora.run_plots import finite_number

CURVE_FILES = {"round": "curves-round.png", "bytes": "curves-bytes.png"}
_DPI = 110
_FIGSIZE = (11.0, 4.5)  # inches: two panels side by side


@dataclass(frozen=True)
class CurvePoint:
    """One arm after ``round`` rounds: global and own held-out figure, bytes moved so far."""

    round: int
    global_value: float | None
    own_value: float | None
    bytes_moved: int = 0


Curves = dict[str, list[CurvePoint]]


def curve_rounds(rounds: int, points: int) -> list[int]:
    """The rounds at which an in-process arm is evaluated: about ``points``, the last included."""
    stride = max(1, -(-rounds // max(points, 1)))
    chosen = list(range(stride, rounds + 1, stride))
    return chosen if chosen and chosen[-1] == rounds else [*chosen, rounds]


def federated_curve(lines: Sequence[Mapping[str, Any]], classification: bool) -> list[CurvePoint]:
    """The federated arm's curve from ``metrics.jsonl``: every round, round 0 included.

    Global figure: the coordinator's evaluation on ``data.eval-path`` where the run has one,
    else the sites' held-out figures weighted together (the pooled held-out set).
    """
    metric = "accuracy" if classification else "perplexity"
    points, moved = [], 0
    for line in sorted(lines, key=lambda line: int(line["round"])):
        moved += int(line.get("bytes_up") or 0) + int(line.get("bytes_down") or 0)
        own = finite_number(line.get(f"eval_{metric}"))
        coordinator = finite_number(line.get(f"global_eval_{metric}"))
        points.append(CurvePoint(int(line["round"]), own if coordinator is None else coordinator,
                                 own, moved))  # fmt: skip
    return points


def rounds_to_reach(
    points: Sequence[CurvePoint], reference: float, fraction: float, higher_is_better: bool
) -> int | None:
    """The first round whose global figure is ``fraction`` of ``reference`` (None: never).

    Accuracy: ``value >= fraction * reference``. Perplexity (lower is better):
    ``reference / value >= fraction``.
    """
    for point in points:
        value = point.global_value
        if value is None:
            continue
        reached = (
            value >= fraction * reference if higher_is_better else reference >= fraction * value
        )
        if reached:
            return point.round
    return None


def best_point(points: Sequence[CurvePoint], higher_is_better: bool) -> CurvePoint | None:
    """The point with the best global figure (the earliest of equals); None if none has one."""
    known = [p for p in points if p.global_value is not None]
    if not known:
        return None
    sign = 1.0 if higher_is_better else -1.0
    return max(known, key=lambda p: (sign * (p.global_value or 0.0), -p.round))


def curves_json(curves: Curves) -> dict[str, list[dict[str, Any]]]:
    return {
        arm: [
            {"round": p.round, "global": p.global_value, "own": p.own_value, "bytes": p.bytes_moved}
            for p in points
        ]
        for arm, points in curves.items()
    }


def _panel(axes: Any, curves: Curves, x: str, which: str, ylabel: str) -> None:
    for index, (arm, points) in enumerate(curves.items()):
        kept = [p for p in points if getattr(p, f"{which}_value") is not None]
        xs = [p.round if x == "round" else p.bytes_moved for p in kept]
        ys = [getattr(p, f"{which}_value") for p in kept]
        if xs:
            axes.plot(xs, ys, marker="o", markersize=3, label=arm, color=f"C{index % 10}")
    axes.set_xlabel("round" if x == "round" else "bytes moved (all sites, cumulative)")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)


def plot_curves(curves: Curves, out_dir: Path, classification: bool) -> dict[str, Path]:
    """``curves-round.png`` (global and own figure per round) and ``curves-bytes.png``."""
    metric = "accuracy" if classification else "perplexity"
    paths = {}
    for x, name in CURVE_FILES.items():
        figure = Figure(figsize=_FIGSIZE, dpi=_DPI)
        FigureCanvasAgg(figure)
        left, right = figure.subplots(1, 2)
        if x == "round":
            _panel(left, curves, x, "global", f"global {metric}")
            _panel(right, curves, x, "own", f"own held-out {metric}")
        else:  # only the arms that move bytes have a bytes axis worth drawing
            moving = {arm: pts for arm, pts in curves.items() if any(p.bytes_moved for p in pts)}
            _panel(left, moving, x, "global", f"global {metric}")
            _panel(right, moving, x, "own", f"own held-out {metric}")
        figure.suptitle(f"fedlora compare: {metric} against {x}")
        figure.tight_layout()
        paths[x] = out_dir / name
        figure.savefig(paths[x], format="png")
    return paths
