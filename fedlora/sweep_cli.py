"""``fedlora sweep``'s command line, kept apart from ``fedlora.sweep`` (torch, peft, matplotlib)
so that ``fedlora sweep --help`` answers without loading them.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedlora.arg_types import add_run_arguments, arm_names, finite_number

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


def run_sweep(args: argparse.Namespace) -> int:
    """Run ``fedlora sweep`` with parsed arguments; 0 on success (errors raise)."""
    from fedlora.sweep import sweep

    sweep(
        args.config,
        args.overrides,
        args.vary,
        args.out,
        args.arms,
        args.reference,
        args.tolerance,
    )
    return 0
