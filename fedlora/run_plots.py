"""The plots of a run folder's ``metrics.jsonl``: which series, and how they are drawn.

A series is one plotted line or bar group: ``name -> (rounds, values)``, holding only the rounds
where the metric is a finite number (round 0 has no training loss, a causal LM no accuracy).
``fedlora.report`` embeds the PNGs in ``report.md``; the tests compare the series returned here
with the metrics they were drawn from.

Plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through
``pyplot``, so no display and no global backend state are involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PLOT_FILES = {
    "loss": "loss.png",
    "accuracy": "accuracy.png",
    "bytes": "bytes.png",
    "seconds": "seconds.png",
}
_DPI = 110
_FIGSIZE = (7.5, 4.5)  # inches

# The lines of one plot: name -> (rounds that have a value, the values in those rounds).
Series = dict[str, tuple[list[int], list[float]]]


# ---------------------------------------------------------------------------- series


def finite_number(value: Any) -> float | None:
    """A finite float, or ``None`` for a missing, null or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _collect(
    rounds: Sequence[dict[str, Any]], pick: Callable[[dict[str, Any]], Any]
) -> tuple[list[int], list[float]]:
    """(rounds, values) where ``pick(line)`` is a finite number."""
    xs: list[int] = []
    ys: list[float] = []
    for line in rounds:
        value = finite_number(pick(line))
        if value is not None:
            xs.append(int(line["round"]))
            ys.append(value)
    return xs, ys


def _site_names(rounds: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({site for line in rounds for site in (line.get("sites") or {})})


def _site_metric(site: str, stage: str, key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda line: ((line.get("sites") or {}).get(site) or {}).get(stage, {}).get(key)


def metric_series(rounds: Sequence[dict[str, Any]], metric: str) -> Series:
    """The lines of the loss (``metric="loss"``) or accuracy (``"accuracy"``) plot.

    Names: ``"<site> eval"`` and ``"<site> train"`` per site, ``"global eval (sites,
    weighted)"``, ``"global train (sites, weighted)"`` and ``"global eval (coordinator)"``.
    A series with no value in any round is left out.
    """
    eval_key, train_key = f"eval_{metric}", f"train_{metric}"
    candidates: list[tuple[str, Callable[[dict[str, Any]], Any]]] = []
    for site in _site_names(rounds):
        candidates.append((f"{site} eval", _site_metric(site, "evaluate", eval_key)))
        candidates.append((f"{site} train", _site_metric(site, "train", train_key)))
    candidates += [
        ("global eval (sites, weighted)", lambda line: line.get(eval_key)),
        ("global train (sites, weighted)", lambda line: line.get(train_key)),
        ("global eval (coordinator)", lambda line: line.get(f"global_eval_{metric}")),
    ]
    series: Series = {}
    for name, pick in candidates:
        xs, ys = _collect(rounds, pick)
        if xs:
            series[name] = (xs, ys)
    return series


def bytes_series(rounds: Sequence[dict[str, Any]]) -> Series:
    """Bytes up and down per round, all sites together."""
    return {
        "bytes up": _collect(rounds, lambda line: line.get("bytes_up")),
        "bytes down": _collect(rounds, lambda line: line.get("bytes_down")),
    }


def seconds_series(rounds: Sequence[dict[str, Any]]) -> Series:
    """Wall seconds of the train and evaluate phases per round."""
    return {
        "train": _collect(rounds, lambda line: line.get("seconds_train")),
        "evaluate": _collect(rounds, lambda line: line.get("seconds_eval")),
    }


# ---------------------------------------------------------------------------- plots


def _style(name: str, sites: list[str]) -> dict[str, Any]:
    """One colour per site (train dashed, eval solid); global lines thick and dark."""
    dashed = name.endswith(" train") or name.startswith("global train")
    linestyle = "--" if dashed else "-"
    if name.startswith("global"):
        color = "tab:red" if "coordinator" in name else "black"
        return {"color": color, "linewidth": 2.4, "linestyle": linestyle}
    site = name.rsplit(" ", 1)[0]
    # tab10 has ten colours; an eleventh site reuses the first, still told apart by the legend.
    index = sites.index(site) if site in sites else 0
    return {"color": f"C{index % 10}", "linewidth": 1.3, "linestyle": linestyle, "alpha": 0.85}


def plot_lines(series: Series, path: Path, title: str, ylabel: str) -> Series:
    """Draw ``series`` as lines with markers against the round; return ``series``."""
    figure = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    sites = sorted({name.rsplit(" ", 1)[0] for name in series if not name.startswith("global")})
    for name, (xs, ys) in series.items():
        axes.plot(xs, ys, marker="o", markersize=3.5, label=name, **_style(name, sites))
    axes.set_title(title)
    axes.set_xlabel("round (0 = before training)")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if series:
        axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return series


def plot_bars(series: Series, path: Path, title: str, ylabel: str) -> Series:
    """Draw ``series`` as grouped bars per round; return ``series``."""
    figure = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(len(series), 1)
    for index, (name, (xs, ys)) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * width
        axes.bar([x + offset for x in xs], ys, width=width, label=name)
    axes.set_title(title)
    axes.set_xlabel("round (0 = before training)")
    axes.set_ylabel(ylabel)
    axes.grid(True, axis="y", alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return series


def draw_plots(
    rounds: Sequence[dict[str, Any]], out_dir: Path
) -> tuple[dict[str, Path], dict[str, Series]]:
    """Write every plot that has data; return ``({plot: path}, {plot: series})``."""
    paths: dict[str, Path] = {}
    drawn: dict[str, Series] = {}
    jobs: list[tuple[str, Series, Callable[..., Series], str, str]] = [
        ("loss", metric_series(rounds, "loss"), plot_lines, "Loss per round", "loss (nats)"),
        ("accuracy", metric_series(rounds, "accuracy"), plot_lines, "Accuracy", "accuracy"),
        ("bytes", bytes_series(rounds), plot_bars, "Bytes per round, all sites", "bytes"),
        ("seconds", seconds_series(rounds), plot_bars, "Seconds per phase", "seconds (wall)"),
    ]
    for name, series, draw, title, ylabel in jobs:
        if not any(xs for xs, _ in series.values()):
            continue  # e.g. no accuracy in a causal-LM run
        paths[name] = out_dir / PLOT_FILES[name]
        drawn[name] = draw(series, paths[name], title, ylabel)
    return paths, drawn
