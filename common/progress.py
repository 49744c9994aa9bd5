"""Terminal progress for long work (rounds, sites, steps), printed with ``rich``.

Sites run inside Ray worker processes in simulation; their stdout is forwarded to the driver,
so a site prints plain single lines rather than live widgets.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
