"""Argument types and arguments shared by the ``fedlora`` subcommands: a bad value is a usage
error (rc 2, the subcommand's usage and one line) before any work starts, not a traceback
later."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from fedlora.compare_arms import check_arms


def output_folder(text: str) -> Path:
    """A folder to write into: absent (it is created) or a folder, never an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def finite_number(low: float, *, low_allowed: bool) -> Callable[[str], float]:
    """A finite number above ``low`` (or equal to it, where ``low_allowed``)."""
    bound = f"{'>=' if low_allowed else '>'} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value >= low if low_allowed else value > low
        if not (above and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}")
        return value

    return parse


def arm_names(text: str) -> list[str]:
    """``--arms ARM,ARM``: names of ``fedlora compare``'s arms, checked (``check_arms``)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        check_arms(names)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return names


def add_run_arguments(
    parser: argparse.ArgumentParser, set_help: str, reference_help: str, resume_help: str
) -> None:
    """The arguments of a command that runs ``fedlora compare``'s arms (``compare``, ``sweep``):
    the config, ``--out``, ``--set``, ``--reference`` and ``--resume``; each command words the
    last three's help for what it does with them."""
    parser.add_argument("config", type=Path, help="run config (TOML), e.g. examples/tiny.toml")
    parser.add_argument(
        "--out", type=output_folder, required=True, help="output folder (new or empty)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=set_help,
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="train.KEY=VALUE",
        help=reference_help,
    )
    parser.add_argument("--resume", action="store_true", help=resume_help)
