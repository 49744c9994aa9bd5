"""``fedlora compare``'s command line, kept apart from ``fedlora.compare`` (torch, peft,
datasets) so that ``fedlora --help`` and ``fedlora compare --help`` answer without loading them.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedlora.arg_types import add_run_arguments, arm_names, finite_number
from fedlora.compare_arms import ARMS, DEFAULT_CURVE_POINTS

DESCRIPTION = """\
The pilot's ROI table on one data split and seed. Every arm is evaluated on the same global set
(data.eval-path, else every site's held-out examples pooled) and on every site's own held-out
split:

  base                     the base model untouched (LoRA B = 0)
  local-only               each site trains alone, the federation's rounds x local steps
  federated                `fedlora simulate` of the config, its last registry version
  personalized             each site fine-tunes the federated adapter for --personalize-steps
  centralized              all sites' training data pooled, the federation's examples budget
  centralized-equal-steps  the pooled data, only the federation's sequential steps
  centralized-full         centralized's data and steps with every base parameter trained (full
                           fine-tuning); skipped, saying why, where it would not fit in memory

Per arm: loss, perplexity (causal LM) or accuracy (classification), trainable parameters, bytes
moved, wall seconds and peak resident memory; for centralized-full also seconds per step and
the bytes a federation of full models would move per round per site. Writes DIR/compare.json,
DIR/compare.md, the curves curves-round.png and curves-bytes.png, and the federated run under
DIR/federated.
"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_compare_parser(subparsers: Any) -> None:
    """Add ``compare`` to the ``fedlora`` sub-parsers."""
    parser = subparsers.add_parser(
        "compare",
        help="the ROI table: base, local-only, federated and centralized LoRA on one split",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(
        parser,
        set_help="override a config key (repeatable), as for `fedlora simulate`",
        reference_help="train setting of the in-process arms (local-only, centralized, "
        "personalized) where it should differ from the federation's, e.g. --reference "
        "train.optimizer=adamw --reference train.lr=5e-3 when the sites run SGD (repeatable)",
        resume_help="go on with a compare stopped in --out (Ctrl-C): the finished arms are "
        "taken from DIR/arms, the federated run resumes from its last round (same config and "
        "options; --arms may differ)",
    )
    parser.add_argument(
        "--curve-points",
        type=_positive,
        default=DEFAULT_CURVE_POINTS,
        metavar="N",
        help="evaluate the in-process arms about N times over the rounds for the curves "
        f"(default {DEFAULT_CURVE_POINTS}; the federated arm is evaluated every round)",
    )
    parser.add_argument(
        "--personalize-steps",
        type=_positive,
        default=None,
        metavar="N",
        help="local steps each site fine-tunes the federated adapter for the personalized "
        "arm (default: train.local-steps)",
    )
    parser.add_argument(
        "--arms",
        type=arm_names,
        default=list(ARMS),
        metavar="ARM,ARM",
        help="the arms to run, comma-separated (default: all of them); e.g. "
        "--arms federated,centralized for the headline ratio alone",
    )
    parser.add_argument(
        "--full-lr",
        type=finite_number(0, low_allowed=False),
        default=None,
        metavar="LR",
        help="learning rate of the centralized-full arm (default: the centralized arm's); full "
        "fine-tuning usually wants a far smaller one than LoRA, e.g. 5e-5",
    )


def compare_command(args: argparse.Namespace) -> list[str]:
    """The ``fedlora compare`` command line of ``args`` (without ``--resume``)."""
    command = ["fedlora", "compare", str(args.config), "--out", str(args.out)]
    command += [arg for item in args.overrides for arg in ("--set", item)]
    command += [arg for item in args.reference for arg in ("--reference", item)]
    if args.curve_points != DEFAULT_CURVE_POINTS:
        command += ["--curve-points", str(args.curve_points)]
    if args.personalize_steps is not None:
        command += ["--personalize-steps", str(args.personalize_steps)]
    if args.arms != list(ARMS):
        command += ["--arms", ",".join(args.arms)]
    if args.full_lr is not None:
        command += ["--full-lr", str(args.full_lr)]
    return command


def run_compare(args: argparse.Namespace) -> int:
    """Run ``fedlora compare`` with parsed arguments; 0 on success (errors raise).

    The first Ctrl-C or SIGTERM stops it within seconds with one line (what ran, what is kept,
    the command that goes on) and exit code 130 (``fedlora.interrupt``); a second exits at once.
    """
    from common.config import load_config
    from fedlora.compare_progress import interrupted_line
    from fedlora.interrupt import RunInterrupted, exit_interrupted, stop_on_signals

    cfg = load_config(args.config, args.overrides)
    try:
        with stop_on_signals():
            from fedlora.compare import compare, reference_train

            compare(
                cfg,
                args.out,
                args.curve_points,
                args.personalize_steps,
                reference_train(cfg, args.reference),
                args.full_lr,
                args.arms,
                resume=args.resume,
            )
    except RunInterrupted as stop:
        exit_interrupted(interrupted_line(stop, args.out, compare_command(args)))
    return 0
