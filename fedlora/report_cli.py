"""``fedlora report``'s command line, kept apart from ``fedlora.report`` (matplotlib, the
registry's torch and peft) so that ``fedlora report --help`` answers without loading them.
``fedlora.report`` never imports this module back: ``python -m fedlora.report_cli`` runs it alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import FedloraError
from fedlora.arg_types import output_folder


def add_report_parser(subparsers: Any) -> None:
    """Add ``report`` to the ``fedlora`` command's subparsers."""
    parser = subparsers.add_parser(
        "report",
        help="plots and a Markdown report of a run folder",
        description="Read RUN_DIR (metrics.jsonl, summary.json, config.json, registry, "
        "audit.jsonl) and write loss/accuracy/bytes/seconds PNGs and report.md.",
    )
    add_report_arguments(parser)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR and ``--out``: shared by ``fedlora report`` and ``python -m fedlora.report``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a fedlora run folder")
    parser.add_argument(
        "--out", type=output_folder, default=None, help="output folder (default RUN_DIR/report)"
    )


def run_report(args: argparse.Namespace) -> int:
    """Run ``fedlora report`` with parsed arguments; 0 on success (errors raise ReportError)."""
    from fedlora.report import write_report

    report = write_report(args.run_dir, args.out)
    print(f"wrote {report.markdown} and {len(report.plots)} plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedlora.report_cli RUN_DIR [--out DIR]``; exit 2 on a FedloraError."""
    parser = argparse.ArgumentParser(
        prog="fedlora report", description="plots and a Markdown report of a run folder"
    )
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_report(args)
    except FedloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
