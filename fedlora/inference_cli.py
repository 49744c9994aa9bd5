"""``fedlora generate`` and ``fedlora predict``'s command line, kept apart from
``fedlora.inference`` (torch, peft) so that their ``--help`` answers without loading them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.progress import console


def add_inference_parsers(sub: Any) -> None:
    """The ``generate`` and ``predict`` subcommands."""
    for name, text_flag, what in (
        ("generate", "--prompt", "generate a reply (greedy) with base + adapters"),
        ("predict", "--text", "classify a text with base + adapters"),
    ):
        parser = sub.add_parser(
            name,
            help=what,
            description=what.capitalize() + ". Each adapter folder is a registry version "
            "(PEFT files + manifest.json) or an exported copy; an adapter whose manifest names "
            "another base fingerprint is refused before it is loaded.",
        )
        parser.add_argument("--model", required=True, help="alias, HF folder or .gguf (the base)")
        parser.add_argument(
            "--adapters",
            nargs="+",
            type=Path,
            required=True,
            help="adapter folders, applied together",
        )
        parser.add_argument(text_flag, dest="text", required=True, help="the input text")
        if name == "generate":
            parser.add_argument("--max-new-tokens", type=int, default=64)
        parser.add_argument("--seed", type=int, default=0, help="model.seed of the run")


def run_inference(args: argparse.Namespace) -> int:
    """Run ``generate`` or ``predict`` with parsed arguments; 0 on success."""
    from fedlora.inference import generate, predict

    if args.command == "generate":
        console.print(generate(args.model, args.adapters, args.text, args.max_new_tokens))
    else:
        label, probability = predict(args.model, args.adapters, args.text, args.seed)
        console.print(f"{label}\t{probability:.3f}")
    return 0
