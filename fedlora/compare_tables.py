"""``fedlora compare``'s Markdown tables: one row per arm, each site's own figure per arm, and
each arm's global figure per evaluated round."""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.compare_curves import Curves
from fedlora.compare_measures import Arm, Quality


def _quality_cells(q: Quality, classification: bool) -> list[str]:
    if classification:
        return [
            f"{100 * (q.global_accuracy or 0):.1f}",
            f"{100 * (q.site_accuracy or 0):.1f}",
            f"{q.global_loss:.4f}",
        ]
    return [f"{q.global_perplexity:.3f}", f"{q.site_perplexity:.3f}", f"{q.global_loss:.4f}"]


def markdown_table(arms: Sequence[Arm], classification: bool) -> str:
    metric = "accuracy %" if classification else "perplexity"
    head = [
        "arm",
        f"global {metric}",
        f"own held-out {metric}",
        "global loss",
        "trainable params",
        "bytes moved",
        "wall s",
        "peak RSS GiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        rss = "-" if arm.peak_rss_bytes is None else f"{arm.peak_rss_bytes / 2**30:.2f}"
        cells = [
            arm.name,
            *_quality_cells(arm.quality, classification),
            f"{arm.trainable_parameters:,}",
            f"{arm.bytes_moved:,}",
            f"{arm.seconds:.1f}",
            rss,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def site_table(arms: Sequence[Arm], groups: dict[str, str], classification: bool) -> str:
    """Each site's own held-out accuracy (%) or perplexity, per arm (local-only: its own)."""
    key = "accuracy" if classification else "perplexity"
    head = ["site", "data", *(arm.name for arm in arms)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for site, group in groups.items():
        cells = [site, group]
        for arm in arms:
            value = arm.quality.sites.get(site, {}).get(key)
            scale = 100 if classification else 1
            cells.append(
                "-" if value is None else f"{scale * value:.{1 if classification else 3}f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(curves: Curves, classification: bool) -> str:
    """Global figure per arm at each round any arm was evaluated (``-``: not evaluated)."""
    scale, digits = (100, 1) if classification else (1, 3)
    rounds = sorted({p.round for points in curves.values() for p in points if p.round > 0})
    at = {arm: {p.round: p.global_value for p in points} for arm, points in curves.items()}
    head = ["round", *curves]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        cells = [str(r)]
        for arm in curves:
            value = at[arm].get(r)
            cells.append("-" if value is None else f"{scale * value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
