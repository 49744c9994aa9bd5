"""The ``fedlora`` command.

fedlora simulate CONFIG.toml --out DIR [--set section.key=value ...]
fedlora demo [--out DIR]
fedlora fingerprint MODEL [--task causal-lm|classification] [--num-labels N]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from common.errors import FedloraError
from common.progress import console
from fedlora.compare import add_compare_parser, run_compare
from fedlora.deploy import add_coordinator_parser, run_coordinator
from fedlora.deploy_site import add_site_parser, run_site
from fedlora.inference import add_inference_parsers, run_inference
from fedlora.keys_cli import add_keys_parser, run_keys
from fedlora.registry_cli import add_registry_parser, run_registry
from fedlora.report import add_report_parser, run_report

DEPLOY_COMMANDS = {"coordinator": run_coordinator, "site": run_site}
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "demo.toml"

EPILOG = """\
examples:
  fedlora demo                                     # the make-demo run: SmolLM2 on dolly, 3 sites
  fedlora simulate examples/tiny.toml --out runs/tiny
  fedlora simulate examples/banking77.toml --out runs/b77 --set federation.rounds=5
  fedlora compare examples/tiny.toml --out runs/compare   # base / local / federated / central
  fedlora fingerprint smollm2-135m
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated LoRA fine-tuning: sites train adapters on private data and "
        "exchange only adapter deltas with a coordinator.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run a federation on this machine (Flower simulation, one virtual site per worker)",
        description="Run every round of CONFIG in Flower's simulation runtime. Writes "
        "DIR/registry/<module>/vNNNN (PEFT adapters + manifest), DIR/metrics.jsonl (one line "
        "per round) and DIR/summary.json.",
    )
    sim.add_argument("config", type=Path, help="run config (TOML), e.g. examples/tiny.toml")
    sim.add_argument("--out", type=Path, required=True, help="output folder (created)")
    sim.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key, e.g. --set federation.sites=10 (repeatable)",
    )
    sim.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last completed round (same config and --set)",
    )

    demo = sub.add_parser(
        "demo",
        help="the quick-start run: SmolLM2-135M on a dolly slice, 3 sites by category",
        description=f"Runs `fedlora simulate {DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1])}`.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")

    fp = sub.add_parser(
        "fingerprint",
        help="print a base model's SHA-256 fingerprint (last line: the hex digest)",
        description="Load MODEL (alias, HF folder or .gguf file) and print its fingerprint. "
        "Sites and coordinator must print the same digest.",
    )
    fp.add_argument("model", help="smollm2-135m, minilm-l6, tiny-llama, a folder or a .gguf")
    fp.add_argument("--task", choices=["causal-lm", "classification"], default="causal-lm")
    fp.add_argument("--num-labels", type=int, default=None, help="classification head size")
    fp.add_argument("--seed", type=int, default=0, help="seed of a newly initialised head")
    add_inference_parsers(sub)
    add_report_parser(sub)
    add_compare_parser(sub)
    add_keys_parser(sub)
    add_registry_parser(sub)
    add_coordinator_parser(sub)
    add_site_parser(sub)
    return parser


def _simulate(config: Path, out: Path, overrides: list[str], resume: bool = False) -> int:
    from common.config import load_config
    from fedlora.simulate import simulate

    cfg = load_config(config, overrides)
    summary = simulate(cfg, out, resume=resume)
    first, last = summary["initial_eval_loss"], summary["final_eval_loss"]
    losses = f"{first:.4f} → {last:.4f}" if first is not None and last is not None else "n/a"
    failed = f", failed rounds {summary['failed_rounds']}" if summary["failed_rounds"] else ""
    stopped = f", stopped: {summary['stopped']}" if summary.get("stopped") else ""
    console.print(
        f"[green]done[/]: {summary['rounds']} rounds{failed}{stopped}, eval loss {losses}; "
        f"adapter {summary['adapter_dir']}; metrics {out / 'metrics.jsonl'}"
    )
    return 0


def _fingerprint(model: str, task: str, num_labels: int | None, seed: int) -> int:
    from common.config import ModelConfig
    from common.models import load_base

    cfg = ModelConfig.model_validate({"name": model, "task": task, "seed": seed, "device": "cpu"})
    loaded = load_base(cfg, num_labels=num_labels)
    console.print(f"{type(loaded.model).__name__} from {loaded.source}")
    print(loaded.fingerprint)
    return 0


def _configure_logging(level: int) -> None:
    """fedlora's own loggers to the terminal; Flower keeps its own handler and level."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("common", "client", "server", "fedlora"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command == "simulate":
            return _simulate(args.config, args.out, args.overrides, args.resume)
        if args.command == "demo":
            return _simulate(DEMO_CONFIG, args.out, args.overrides)
        if args.command == "fingerprint":
            return _fingerprint(args.model, args.task, args.num_labels, args.seed)
        if args.command == "report":
            return run_report(args)
        if args.command == "compare":
            return run_compare(args)
        if args.command in ("generate", "predict"):
            return run_inference(args)
        if args.command == "keys":
            return run_keys(args)
        if args.command == "registry":
            return run_registry(args)
        if args.command in DEPLOY_COMMANDS:
            return DEPLOY_COMMANDS[args.command](args)
    except FedloraError as exc:
        console.print(f"[red]error[/]: {exc}", soft_wrap=True)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
