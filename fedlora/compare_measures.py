"""What ``fedlora compare`` measures of each arm: its quality (the global set and each site's
held-out split), the process's peak resident memory, and the bytes pooling the data moves.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.data import Example
from common.evaluation import EvalResult


@dataclass(frozen=True)
class Quality:
    """Evaluation of one adapter state: global set and the mean over the sites' held-out."""

    global_loss: float
    global_perplexity: float
    global_accuracy: float | None
    site_loss: float
    site_perplexity: float
    site_accuracy: float | None
    # Each site's own held-out figures: site id -> {"loss", "perplexity", "accuracy"}.
    sites: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Arm:
    name: str
    quality: Quality
    trainable_parameters: int
    bytes_moved: int
    seconds: float
    peak_rss_bytes: int | None


# ---------------------------------------------------------------------------- measuring


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sample this process's resident memory every 50 ms while in the ``with`` block.

    ``peak`` is the largest sample in bytes, or None where /proc is missing (not Linux): no
    figure rather than a wrong one.
    """

    def __init__(self) -> None:
        self.peak: int | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak or 0, _rss_bytes())

    def __enter__(self) -> PeakRSS:
        if Path("/proc/self/statm").is_file():
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak or 0, _rss_bytes())


def _mean(results: Sequence[EvalResult], weight: Callable[[EvalResult], float]) -> float:
    total = sum(weight(r) for r in results)
    return sum(r.loss * weight(r) for r in results) / total if total else float("nan")


def quality_of(global_result: EvalResult, own: dict[str, EvalResult]) -> Quality:
    """Global figures, and the sites' held-out figures weighted by tokens (loss) / examples."""
    site_loss = _mean(list(own.values()), lambda r: r.tokens)
    accuracies = [(r.accuracy, r.examples) for r in own.values() if r.accuracy is not None]
    examples = sum(n for _, n in accuracies)
    return Quality(
        global_loss=global_result.loss,
        global_perplexity=global_result.perplexity,
        global_accuracy=global_result.accuracy,
        site_loss=site_loss,
        site_perplexity=math.exp(min(site_loss, 50.0)),
        site_accuracy=sum(a * n for a, n in accuracies) / examples if accuracies else None,
        sites={
            name: {"loss": r.loss, "perplexity": r.perplexity, "accuracy": r.accuracy}
            for name, r in own.items()
        },
    )


def mean_quality(per_site: Sequence[Quality]) -> Quality:
    """Local-only: the mean of each site's figures (its own adapter on global and own data)."""

    def avg(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None

    global_loss = statistics.fmean(q.global_loss for q in per_site)
    site_loss = statistics.fmean(q.site_loss for q in per_site)
    return Quality(
        global_loss=global_loss,
        global_perplexity=statistics.fmean(q.global_perplexity for q in per_site),
        global_accuracy=avg([q.global_accuracy for q in per_site]),
        site_loss=site_loss,
        site_perplexity=statistics.fmean(q.site_perplexity for q in per_site),
        site_accuracy=avg([q.site_accuracy for q in per_site]),
        sites={name: figures for q in per_site for name, figures in q.sites.items()},
    )


def data_bytes(examples: Sequence[Example]) -> int:
    """UTF-8 bytes of the examples' text, response and label: what pooling must move."""
    return sum(
        len(e.text.encode()) + len((e.response or "").encode()) + (8 if e.label is not None else 0)
        for e in examples
    )
