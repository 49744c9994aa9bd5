"""The ``fedlora`` command.

fedlora simulate CONFIG.toml --out DIR [--set section.key=value ...] [--resume]
fedlora demo [--out DIR] [--resume]
fedlora fingerprint MODEL [--task causal-lm|classification] [--num-labels N]

Every subcommand's parser lives in a module that imports neither torch nor peft (the
``*_cli`` modules, ``deploy``, ``deploy_site``): ``fedlora --help``, ``fedlora X --help`` and a
usage error answer in about a second, and a command loads the heavy modules when it runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.errors import FedloraError
from common.progress import console
from fedlora.arg_types import output_folder
from fedlora.compare_cli import add_compare_parser, run_compare
from fedlora.deploy import add_coordinator_parser, run_coordinator
from fedlora.deploy_site import add_site_parser, run_site
from fedlora.inference_cli import add_inference_parsers, run_inference
from fedlora.keys_cli import add_keys_parser, run_keys
from fedlora.registry_cli import add_registry_parser, run_registry
from fedlora.report_cli import add_report_parser, run_report
from fedlora.sweep_cli import add_sweep_parser, run_sweep

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "demo.toml"
# fedlora's own loggers: -v, -q and --log-file set them; Flower keeps its own handler and level.
LOGGERS = ("common", "client", "server", "fedlora")
# The name of the handlers configure_logging adds, so that a second main() in one process (the
# tests) replaces them instead of printing every line twice.
HANDLER_NAME = "fedlora-cli"

EPILOG = """\
examples:
  fedlora demo                                     # the make-demo run: SmolLM2 on dolly, 3 sites
  fedlora simulate examples/tiny.toml --out runs/tiny
  fedlora simulate examples/banking77.toml --out runs/b77 --set federation.rounds=5
  fedlora compare examples/tiny.toml --out runs/compare   # base / local / federated / central
  fedlora sweep examples/tiny.toml --vary modules.shared.rank=2,4 --out runs/sweep
  fedlora fingerprint smollm2-135m
"""


def _add_logging_options(parser: argparse.ArgumentParser, top_level: bool) -> None:
    """-v, -q and --log-file. A subcommand's copies default to SUPPRESS, so that they do not
    overwrite what was given before the subcommand (``fedlora -v simulate ...``)."""

    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    group = parser.add_argument_group("logging")
    level = group.add_mutually_exclusive_group()
    level.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const=logging.DEBUG,
        default=default(logging.INFO),
        help="debug logging",
    )
    level.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const=logging.WARNING,
        default=default(logging.INFO),
        help="log only warnings and errors",
    )
    group.add_argument(
        "--log-file",
        type=Path,
        default=default(None),
        metavar="FILE",
        help="also append every log record, debug included, to FILE",
    )


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: takes the logging options too, and answers an unknown argument
    with its own usage rather than the top-level one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_logging_options(self, top_level=False)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _version() -> str:
    try:
        return importlib.metadata.version("fedlora")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated LoRA fine-tuning: sites train adapters on private data and\n"
        "exchange only adapter deltas with a coordinator.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"fedlora {_version()}")
    _add_logging_options(parser, top_level=True)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    _add_simulate_parsers(sub)
    add_inference_parsers(sub)
    add_report_parser(sub)
    add_compare_parser(sub)
    add_sweep_parser(sub)
    add_keys_parser(sub)
    add_registry_parser(sub)
    add_coordinator_parser(sub)
    add_site_parser(sub)
    return parser


def _add_simulate_parsers(sub: Any) -> None:
    """``simulate``, ``demo`` and ``fingerprint``."""
    resume_help = "continue the run in --out from its last completed round (same config and --set)"
    sim = sub.add_parser(
        "simulate",
        help="run a federation on this machine (Flower simulation, one virtual site per worker)",
        description="Run every round of CONFIG in Flower's simulation runtime. Writes "
        "DIR/registry/<module>/vNNNN (PEFT adapters + manifest), DIR/metrics.jsonl (one line "
        "per round) and DIR/summary.json.",
    )
    sim.add_argument("config", type=Path, help="run config (TOML), e.g. examples/tiny.toml")
    sim.add_argument("--out", type=output_folder, required=True, help="output folder (created)")
    sim.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key, e.g. --set federation.sites=10 (repeatable)",
    )
    sim.add_argument("--resume", action="store_true", help=resume_help)

    demo = sub.add_parser(
        "demo",
        help="the quick-start run: SmolLM2-135M on a dolly slice, 3 sites by category",
        description=f"Runs `fedlora simulate {DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1])}`"
        ": SmolLM2-135M-Instruct fine-tuned on a slice of dolly, split by instruction category "
        "over 3 simulated sites, for 3 rounds.",
    )
    demo.add_argument("--out", type=output_folder, default=Path("runs/demo"), help="output folder")
    demo.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a key of the demo config, e.g. --set federation.rounds=1 (repeatable)",
    )
    demo.add_argument("--resume", action="store_true", help=resume_help)

    fp = sub.add_parser(
        "fingerprint",
        help="print a base model's SHA-256 fingerprint (last line: the hex digest)",
        description="Load MODEL (alias, Hugging Face hub id from the local cache, folder or .gguf "
        "file) and print its fingerprint. "
        "Sites and coordinator must print the same digest.",
    )
    fp.add_argument(
        "model", help="smollm2-135m, minilm-l6, tiny-llama, a hub id (org/name), folder or .gguf"
    )
    fp.add_argument("--task", choices=["causal-lm", "classification"], default="causal-lm")
    fp.add_argument("--num-labels", type=int, default=None, help="classification head size")
    fp.add_argument("--seed", type=int, default=0, help="seed of a newly initialised head")


def _simulate(
    command: list[str], config: Path, out: Path, overrides: list[str], resume: bool
) -> int:
    """``command``: how the user names this run (``fedlora simulate CONFIG`` or ``fedlora
    demo``), for the line that says how to resume it."""
    from common.config import load_config
    from server.rundir import check_start

    cfg = load_config(config, overrides)
    check_start(out, resume)  # before the seconds of importing torch (simulate checks again)
    from fedlora.interrupt import RunInterrupted, exit_interrupted, resume_hint, stop_on_signals

    try:
        with stop_on_signals():
            from fedlora.simulate import simulate

            summary = simulate(cfg, out, resume=resume)
    except RunInterrupted:
        options = [arg for item in overrides for arg in ("--set", item)]
        exit_interrupted(resume_hint([*command, "--out", str(out), *options], out))
    first, last = summary["initial_eval_loss"], summary["final_eval_loss"]
    losses = f"{first:.4f} → {last:.4f}" if first is not None and last is not None else "n/a"
    failed = f", failed rounds {summary['failed_rounds']}" if summary["failed_rounds"] else ""
    stopped = f", stopped: {summary['stopped']}" if summary.get("stopped") else ""
    console.print(
        f"[green]done[/]: {summary['rounds']} rounds{failed}{stopped}, eval loss {losses}; "
        f"adapter {summary['adapter_dir']}; metrics {out / 'metrics.jsonl'}"
    )
    return 0


def _run_simulate(args: argparse.Namespace) -> int:
    command = ["fedlora", "simulate", str(args.config)]
    return _simulate(command, args.config, args.out, args.overrides, args.resume)


def _run_demo(args: argparse.Namespace) -> int:
    return _simulate(["fedlora", "demo"], DEMO_CONFIG, args.out, args.overrides, args.resume)


def _run_fingerprint(args: argparse.Namespace) -> int:
    from common.config import ModelConfig
    from common.models import load_base

    spec = {"name": args.model, "task": args.task, "seed": args.seed, "device": "cpu"}
    cfg = ModelConfig.model_validate(spec)
    loaded = load_base(cfg, num_labels=args.num_labels)
    console.print(f"{type(loaded.model).__name__} from {loaded.source}")
    print(loaded.fingerprint)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "simulate": _run_simulate,
    "demo": _run_demo,
    "fingerprint": _run_fingerprint,
    "report": run_report,
    "compare": run_compare,
    "sweep": run_sweep,
    "generate": run_inference,
    "predict": run_inference,
    "keys": run_keys,
    "registry": run_registry,
    "coordinator": run_coordinator,
    "site": run_site,
}


def configure_logging(level: int, log_file: Path | None = None) -> None:
    """fedlora's own loggers to the terminal at ``level``, and at DEBUG to ``log_file``."""
    terminal = logging.StreamHandler()
    terminal.set_name(HANDLER_NAME)
    terminal.setLevel(level)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers: list[logging.Handler] = [terminal]
    if log_file is not None:
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.set_name(HANDLER_NAME)
        to_file.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
        )
        handlers.append(to_file)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if log_file is not None else level)
        for old in [h for h in logger.handlers if h.get_name() == HANDLER_NAME]:
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            logger.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_file)
    except OSError as exc:  # --log-file names a folder, or one that does not exist
        console.print(f"[red]error[/]: --log-file: {exc}", soft_wrap=True)
        return 2
    try:
        return COMMANDS[args.command](args)
    except FedloraError as exc:
        console.print(f"[red]error[/]: {exc}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
