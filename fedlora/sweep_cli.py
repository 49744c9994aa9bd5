"""``fedlora sweep``'s command line, kept apart from ``fedlora.sweep`` (torch, peft, matplotlib)
so that ``fedlora sweep --help`` answers without loading them.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.arg_types import add_run_arguments, arm_names, finite_number

if TYPE_CHECKING:
    from fedlora.interrupt import RunInterrupted

# The arms that depend on an adapter or schedule setting; base (LoRA B = 0) and
# centralized-full (no adapter) would be the same for every rank: run them once with compare.
SWEEP_ARMS = ("local-only", "federated", "personalized", "centralized", "centralized-equal-steps")
DEFAULT_ARMS = ("federated", "centralized")

DESCRIPTION = """\
Which rank, learning rate or schedule? `fedlora compare`'s arms once per value of each --vary
(several --vary make a grid), each value's run in its own folder DIR/KEY=VALUE, then one table:

  per setting  federated and centralized quality (accuracy %, or perplexity for a causal LM),
               own held-out quality, trainable parameters, bytes per round (up + down, all
               sites), peak memory, seconds, inference latency unmerged and merged
  recommended  the cheapest setting (fewest bytes per round, then fewest trainable parameters)
               whose federated quality is within --tolerance of the best, and why

Writes DIR/sweep.json, DIR/sweep.md and DIR/sweep.png (federated quality against bytes per
round, one point per setting, the recommended one ringed). Values are read as --set reads them.

example:
  fedlora sweep examples/tiny.toml --vary modules.shared.rank=2,4,8 --out runs/sweep
"""


def _arms(text: str) -> list[str]:
    names = arm_names(text)
    if "federated" not in names:
        raise argparse.ArgumentTypeError("the recommendation needs the 'federated' arm: add it")
    fixed = [name for name in names if name not in SWEEP_ARMS]
    if fixed:
        raise argparse.ArgumentTypeError(
            f"arm {fixed[0]!r} does not depend on the swept settings; run it once with "
            f"fedlora compare (sweep arms: {', '.join(SWEEP_ARMS)})"
        )
    return names


def add_sweep_parser(subparsers: Any) -> None:
    """Add ``sweep`` to the ``fedlora`` sub-parsers."""
    parser = subparsers.add_parser(
        "sweep",
        help="compare's arms once per value of a setting (rank, lr, ...): a table and a pick",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # --vary first: the options' help lists it before the shared ones, as the main one.
    parser.add_argument(
        "--vary",
        action="append",
        default=[],
        required=True,
        metavar="SECTION.KEY=V1,V2",
        help="a config key and its values, e.g. modules.shared.rank=2,4,8 or train.lr=1e-3,3e-3 "
        "(repeatable: several make a grid)",
    )
    add_run_arguments(
        parser,
        set_help="override a config key for every setting (repeatable), as for `fedlora simulate`",
        reference_help="train setting of the in-process arms, as for `fedlora compare` "
        "(repeatable)",
        resume_help="go on with a sweep stopped in --out (Ctrl-C): finished settings are "
        "kept, a stopped one resumes as `fedlora compare --resume` does (same arguments)",
    )
    parser.add_argument(
        "--arms",
        type=_arms,
        default=list(DEFAULT_ARMS),
        metavar="ARM,ARM",
        help=f"the arms to run per setting (default: {','.join(DEFAULT_ARMS)}; any of "
        f"{', '.join(SWEEP_ARMS)}; federated is needed)",
    )
    parser.add_argument(
        "--tolerance",
        type=finite_number(0, low_allowed=True),
        default=None,
        metavar="T",
        help="how much worse than the best the recommended setting may be: accuracy points "
        "(default 1) or percent of the best perplexity (default 2)",
    )


def sweep_command(args: argparse.Namespace) -> list[str]:
    """The ``fedlora sweep`` command line of ``args`` (without ``--resume``)."""
    command = ["fedlora", "sweep", str(args.config)]
    command += [arg for item in args.vary for arg in ("--vary", item)]
    command += ["--out", str(args.out)]
    command += [arg for item in args.overrides for arg in ("--set", item)]
    command += [arg for item in args.reference for arg in ("--reference", item)]
    if args.arms != list(DEFAULT_ARMS):
        command += ["--arms", ",".join(args.arms)]
    if args.tolerance is not None:
        command += ["--tolerance", str(args.tolerance)]
    return command


def interrupted_line(stop: RunInterrupted, out: Path, command: list[str]) -> str:
    """One line: the setting and arm the stopped sweep in ``out`` was in, the settings it
    finished, and the command that goes on."""
    from fedlora.compare_progress import SETTINGS_FILE, CompareInterrupted, phase_of

    folders = [p for p in sorted(out.iterdir()) if p.is_dir()] if out.is_dir() else []
    if not any((p / SETTINGS_FILE).is_file() for p in folders):
        return f"interrupted before any setting started; start it again: {shlex.join(command)}"
    done = ", ".join(p.name for p in folders if (p / "compare.md").is_file()) or "none"
    where = (
        f"in setting {stop.out.name} {phase_of(stop)}"
        if isinstance(stop, CompareInterrupted)
        else "between settings"
    )
    return (
        f"interrupted {where} (settings finished: {done}; each finished arm is kept); "
        f"resume with: {shlex.join([*command, '--resume'])}"
    )


def run_sweep(args: argparse.Namespace) -> int:
    """Run ``fedlora sweep`` with parsed arguments; 0 on success (errors raise). Ctrl-C and
    SIGTERM as for ``fedlora compare``: one line, exit 130."""
    from fedlora.interrupt import RunInterrupted, exit_interrupted, stop_on_signals

    try:
        with stop_on_signals():
            from fedlora.sweep import sweep

            sweep(
                args.config,
                args.overrides,
                args.vary,
                args.out,
                args.arms,
                args.reference,
                args.tolerance,
                resume=args.resume,
            )
    except RunInterrupted as stop:
        exit_interrupted(interrupted_line(stop, args.out, sweep_command(args)))
    return 0
