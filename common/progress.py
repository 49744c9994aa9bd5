"""Terminal progress for long work (rounds, sites, steps), printed with ``rich``.

Sites run inside Ray worker processes in simulation; their stdout is forwarded to the driver,
so a site prints plain single lines rather than live widgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def print_step(site: str, server_round: int, step: int, steps: int, loss: float) -> None:
    """One line per local optimizer step: which site, round and step, and the loss."""
    console.print(
        f"[cyan]{site}[/] round {server_round} step {step}/{steps} loss {loss:.4f}", soft_wrap=True
    )


def print_rule(text: str) -> None:
    console.rule(text)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A small table, e.g. the per-site results of one round."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column != "site" else "left")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    console.print(table)


def print_message(text: str) -> None:
    console.print(text, soft_wrap=True)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: whole seconds below an hour, whole minutes above."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def round_progress(done: int, total: int, elapsed_s: float, mean_round_s: float | None) -> str:
    """``round 3/20, elapsed 1m05s, ETA 5m40s``: the ETA is the mean round time so far times
    the rounds left (``-`` until a round has been timed, ``0s`` after the last)."""
    left = max(0, total - done)
    eta = "-" if mean_round_s is None and left else format_duration((mean_round_s or 0.0) * left)
    return f"round {done}/{total}, elapsed {format_duration(elapsed_s)}, ETA {eta}"


class RoundClock:
    """Times the rounds of one run and prints a progress line after each.

    Round 0 (the initial evaluation, no training) and the round a resumed run starts from
    count in the elapsed time but not in the mean round time (``seconds=None``).
    """

    def __init__(self, total: int, now: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.now = now  # seconds
        self.started = now()
        self.round_seconds: list[float] = []

    def round_done(self, server_round: int, seconds: float | None) -> None:
        if seconds is not None:
            self.round_seconds.append(seconds)
        timed = self.round_seconds
        mean = sum(timed) / len(timed) if timed else None
        elapsed = self.now() - self.started
        print_message(round_progress(server_round, self.total, elapsed, mean))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
