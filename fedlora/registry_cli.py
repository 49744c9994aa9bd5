"""``fedlora registry``: list, show, export and verify the adapter versions of a run.

fedlora registry list RUN_DIR [--module M]
fedlora registry show RUN_DIR MODULE VERSION
fedlora registry export RUN_DIR --module M [--version N] --out DIR
fedlora registry export RUN_DIR --modules a,b[:N] --out DIR [--merge [--weights 1,1] ...]
fedlora registry verify RUN_DIR [--model MODEL] [--coordinator-key FILE]
fedlora registry check-base REGISTRY --model NAME [--set model.KEY=VALUE]

Exit status: 0 on success, 1 when ``verify`` finds problems or ``check-base`` a misfit, 2 for
an error (a missing run folder, an unknown module or version, an impossible option).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from common.errors import FedloraError, RegistryError
from common.keys import COORDINATOR_KEY_NAME, load_coordinator_private
from common.progress import console
from common.registry import Registry
from common.registry_format import ADAPTER_FILE, RegistryVersion
from fedlora.arg_types import output_folder
from fedlora.check_base_cli import add_check_base, run_check_base
from server.audit import (
    AUDIT_FILE,
    EVENT_VERSION_PUBLISHED,
    audit_mac_key,
    read_entries,
    verify_chain,
)

_PIPED_WIDTH = 200  # characters per line of `list` when stdout is not a terminal
# Tensors whose first dimension is the number of classes (transformers' classification heads).
_HEAD_SUFFIXES = ("score.weight", "classifier.weight", "classifier.out_proj.weight")

EPILOG = """\
examples:
  fedlora registry list runs/tiny
  fedlora registry show runs/tiny shared latest
  fedlora registry export runs/tiny --module shared --out exported/shared
  fedlora registry export runs/b77 --modules shared,group-a --out exported/both
  fedlora registry export runs/b77 --modules shared,group-a --merge --weights 1,1 --out merged
  fedlora registry verify runs/tiny --model tiny-llama
  fedlora registry check-base runs/tiny --model tiny-llama --set model.seed=1
"""


class UsageError(FedloraError):
    """Options that cannot go together, or a value that does not parse."""


def add_registry_parser(subparsers: Any) -> None:
    """Add ``registry`` and its actions to the ``fedlora`` command's subparsers."""
    parser = subparsers.add_parser(
        "registry",
        help="list, show, export, verify a run's adapter versions; check them on a new base",
        description="Inspect RUN_DIR/registry/<module>/vNNNN (PEFT adapter + manifest.json) "
        "and RUN_DIR/audit.jsonl. Exit 0 on success, 1 when verify finds problems, 2 on errors.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_registry_actions(parser)


def add_registry_actions(parser: argparse.ArgumentParser) -> None:
    """The ``list``, ``show``, ``export`` and ``verify`` actions, under ``registry_command``."""
    actions = parser.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    run_help = "run folder (holds registry/, metrics.jsonl, audit.jsonl)"
    listing = actions.add_parser(
        "list",
        help="one table row per version",
        description="Every version with its parent, round, rule, cohort size, examples, eval "
        "metrics (from the manifest, else from metrics.jsonl), ε, and the prefixes of the base "
        "fingerprint and of the tensors' SHA-256.",
    )
    listing.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=run_help)
    listing.add_argument("--module", help="only this module")
    show = actions.add_parser(
        "show", help="print one version's manifest as JSON", description="Print the manifest."
    )
    show.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=run_help)
    show.add_argument("module", metavar="MODULE", help="module name, e.g. shared")
    show.add_argument("version", metavar="VERSION", help="number (3 or v0003) or 'latest'")
    _add_export(actions, run_help)
    verify = actions.add_parser(
        "verify",
        help="check hashes, manifests, lineage, base fingerprint and the audit chain",
        description="Check every version: manifest parses, SHA-256 of the tensors matches it, "
        "adapter_config.json parses, parents form an unbroken line; with --model, every "
        "manifest's base fingerprint equals the model's. When RUN_DIR/audit.jsonl exists, "
        "check its hash chain and that it records every published version, and with the "
        "coordinator's key every entry's MAC (an edited log fails even when its chain was "
        "recomputed). Prints each problem; exit 0 when there are none, 1 otherwise.",
    )
    verify.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=run_help)
    verify.add_argument(
        "--coordinator-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="the coordinator's private key, to check the audit log's MACs (default: "
        "RUN_DIR/keys/coordinator.key where a simulation left one)",
    )
    _add_model_options(verify, "load this base model (alias, folder, .gguf) and compare "
                       "its fingerprint with every manifest's")  # fmt: skip
    add_check_base(actions)


def _add_export(actions: Any, run_help: str) -> None:
    export = actions.add_parser(
        "export",
        help="copy verified PEFT folders out of the registry (one, several, or merged)",
        description="--module M: OUT is a PEFT folder (PeftModel.from_pretrained(base, OUT)). "
        "--modules a,b: OUT/a and OUT/b, to load as named adapters of one model. "
        "--merge: ONE adapter made by peft's add_weighted_adapter (needs the base model): "
        "'cat' stacks the factors (exact: weights 1,1 behave like both modules active; rank is "
        "the sum), 'svd' truncates the weighted sum to --svd-rank (smaller, approximate). "
        "Hashes are checked first; OUT must not exist or be empty.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=run_help)
    export.add_argument("--module", help="the one module to export")
    export.add_argument("--version", help="version of --module (default: latest)")
    export.add_argument(
        "--modules", help="comma-separated modules, each MODULE or MODULE:VERSION (default latest)"
    )
    export.add_argument("--out", type=output_folder, required=True, help="output folder (created)")
    export.add_argument("--merge", action="store_true", help="merge --modules into one adapter")
    export.add_argument("--weights", help="comma-separated merge weights (default 1 each)")
    export.add_argument("--combination", choices=["cat", "svd"], default="cat", help="merge kind")
    export.add_argument("--svd-rank", type=int, help="rank of an svd merge (default: max rank)")
    _add_model_options(export, "base model for --merge (default: the run's config.json)")


def _add_model_options(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("--model", metavar="MODEL", help=model_help)
    parser.add_argument(
        "--num-labels", type=int, help="classification head size (default: from the adapter)"
    )


def run_registry(args: argparse.Namespace) -> int:
    """Run the parsed ``fedlora registry`` action; return the exit status (0, 1 or 2)."""
    actions = {
        "list": _list,
        "show": _show,
        "export": _export,
        "verify": _verify,
        "check-base": run_check_base,
    }
    try:
        return actions[args.registry_command](args)
    except FedloraError as exc:
        console.print(f"[red]error[/]: {exc}", soft_wrap=True)
        return 2


def _open(run_dir: Path) -> Registry:
    if not run_dir.is_dir():
        raise RegistryError(f"{run_dir}: no such run folder")
    if not (run_dir / "registry").is_dir():
        raise RegistryError(f"{run_dir}: no registry/ folder (not a fedlora run folder?)")
    return Registry(run_dir / "registry")


def _version_arg(text: str | None) -> int | None:
    """``None``/``"latest"`` → None; ``"3"`` or ``"v0003"`` → 3."""
    if text is None or text == "latest":
        return None
    digits = text.removeprefix("v")
    if not digits.isdigit():
        raise UsageError(f"version {text!r}: expected a number (3 or v0003) or 'latest'")
    return int(digits)


def _list(args: argparse.Namespace) -> int:
    registry = _open(args.run_dir)
    modules = [registry.get(args.module).module] if args.module else registry.modules()
    metrics = _metrics_by_version(args.run_dir / "metrics.jsonl")
    columns = ["module", "version", "parent", "round", "rule", "cohort", "examples", "metrics",
               "ε", "fingerprint", "sha256", "created"]  # fmt: skip
    table = Table(title=f"{registry.root}", title_justify="left")
    for column in columns:
        table.add_column(column, no_wrap=column in ("module", "fingerprint", "sha256", "created"))
    for module in modules:
        for entry in registry.versions(module):
            table.add_row(*_row(entry, metrics.get((module, entry.version), {})))
    # Piped output is not squeezed to rich's 80-column default: the rows stay whole for grep.
    out = console if console.is_terminal else Console(width=_PIPED_WIDTH, highlight=False)
    out.print(table)
    return 0


def _row(entry: RegistryVersion, fallback: dict[str, Any]) -> list[str]:
    try:
        manifest = entry.manifest
    except (OSError, ValueError):
        return [entry.module, str(entry.version), *["?"] * 5, "broken manifest: run verify"]
    cohort = manifest.get("cohort")
    sha = manifest.get("sha256")
    return [
        entry.module,
        str(entry.version),
        _text(manifest.get("parent")),
        _text(manifest.get("round")),
        _text(manifest.get("rule")),
        _text(len(cohort) if isinstance(cohort, list) else manifest.get("cohort_size")),
        _text(manifest.get("examples")),
        _key_metrics(_metrics_of(manifest, fallback)),
        _text(manifest.get("epsilon")),
        str(manifest.get("base_fingerprint") or "-")[:12],
        str(sha.get(ADAPTER_FILE, "-") if isinstance(sha, dict) else "-")[:12],
        str(manifest.get("created", "-")).replace("T", " ").removesuffix("Z"),
    ]


_KEY_METRICS = {"eval_loss": "loss", "eval_accuracy": "acc", "global_eval_loss": "global loss"}


def _metrics_of(manifest: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``metrics`` object, else its top-level metrics, else metrics.jsonl's."""
    nested = manifest.get("metrics")
    if isinstance(nested, dict):
        return nested
    return manifest if any(key in manifest for key in _KEY_METRICS) else fallback


def _key_metrics(values: dict[str, Any]) -> str:
    shown = [
        f"{label} {values[key]:.4g}"
        for key, label in _KEY_METRICS.items()
        if isinstance(values.get(key), int | float)
    ]
    return ", ".join(shown) or "-"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics_by_version(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """metrics.jsonl lines by (module, version): the eval of the version a round published."""
    if not path.is_file():
        return {}
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # a torn last line; metrics are informative here
        if isinstance(line, dict) and isinstance(line.get("version"), int):
            found[(str(line.get("module", "shared")), line["version"])] = line
    return found


def _show(args: argparse.Namespace) -> int:
    entry = _open(args.run_dir).get(args.module, _version_arg(args.version))
    try:
        manifest = entry.manifest
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{entry.name}: cannot read its manifest: {exc}") from exc
    console.print_json(json.dumps(manifest, sort_keys=True))
    return 0


def _selection(text: str) -> list[tuple[str, int | None]]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        module, _, version = item.partition(":")
        pairs.append((module, _version_arg(version or None)))
    if not pairs:
        raise UsageError(f"--modules {text!r}: expected MODULE[:VERSION],...")
    return pairs


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise UsageError(f"--weights {text!r}: expected numbers, e.g. 0.5,0.5") from exc


def _export(args: argparse.Namespace) -> int:
    # torch and peft (seconds of imports): only the subcommand that writes PEFT folders loads them.
    from common.registry_export import export, export_many, export_merged

    registry = _open(args.run_dir)
    if (args.module is None) == (args.modules is None):
        raise UsageError("export needs exactly one of --module M or --modules a,b")
    if args.module is None and args.version is not None:
        raise UsageError("--version goes with --module; write --modules a:3,b:1 instead")
    if not args.merge and (args.weights or args.svd_rank or args.combination != "cat"):
        raise UsageError("--weights, --combination and --svd-rank need --merge")
    if args.module is not None:
        if args.merge:
            raise UsageError("--merge needs --modules a,b")
        entry = registry.get(args.module, _version_arg(args.version))
        export(registry, entry.module, entry.version, args.out)
        console.print(f"exported {entry.name} to {args.out}", soft_wrap=True)
        return 0
    selection = _selection(args.modules)
    if not args.merge:
        export_many(registry, selection, args.out)
        names = ", ".join(m for m, _ in selection)
        console.print(f"exported {names} to {args.out}/<module>", soft_wrap=True)
        return 0
    base = _load_model(args, registry)
    export_merged(
        registry, selection, args.out, base, _weights(args.weights), args.combination, args.svd_rank
    )
    names = ", ".join(m for m, _ in selection)
    console.print(f"merged {names} ({args.combination}) into {args.out}", soft_wrap=True)
    return 0


def _load_model(args: argparse.Namespace, registry: Registry) -> Any:
    """The base model named by --model, else by the run's config.json, set up as in the run."""
    from common.config import ModelConfig
    from common.models import load_base

    path = args.run_dir / "config.json"
    saved = json.loads(path.read_text(encoding="utf-8")).get("model", {}) if path.is_file() else {}
    name = args.model or saved.get("name")
    if name is None:
        raise UsageError(f"no --model given and {path} names none")
    quantized = saved.get("quantize") == "4bit"  # fingerprinted from the 4-bit checkpoint
    values = {**saved, "name": name, "device": "auto" if quantized else "cpu"}
    values["dtype"] = saved.get("dtype", "auto") if quantized else "float32"
    try:
        cfg = ModelConfig.model_validate(values)
    except ValidationError as exc:
        raise UsageError(f"{path}: model section does not validate: {exc}") from exc
    labels = args.num_labels
    if cfg.task == "classification" and labels is None:
        labels = _infer_num_labels(registry)
    return load_base(cfg, num_labels=labels)


def _infer_num_labels(registry: Registry) -> int:
    """The class count from a classification head saved with an adapter (modules_to_save)."""
    for module in registry.modules():
        for entry in registry.versions(module)[:1]:
            with safe_open(str(entry.path / ADAPTER_FILE), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if "lora_" not in key and key.endswith(_HEAD_SUFFIXES):
                        return int(handle.get_slice(key).get_shape()[0])
    raise UsageError("classification model: pass --num-labels (no head found in the adapters)")


def _audit_key(args: argparse.Namespace) -> bytes | None:
    """The audit log's MAC key from --coordinator-key, or a simulation's own key file."""
    path = args.coordinator_key
    if path is None:
        default = args.run_dir / "keys" / COORDINATOR_KEY_NAME
        path = default if default.is_file() else None
    if path is None:
        return None
    return audit_mac_key(load_coordinator_private(path).secret_bytes())


def _verify(args: argparse.Namespace) -> int:
    registry = _open(args.run_dir)
    fingerprint = _load_model(args, registry).fingerprint if args.model else None
    problems = registry.verify(model_fingerprint=fingerprint)
    audit = args.run_dir / AUDIT_FILE
    if audit.is_file():
        mac_key = _audit_key(args)
        if mac_key is None:
            console.print(
                f"[yellow]warning[/]: {AUDIT_FILE}: only the hash chain is checked, which "
                "whoever can write the file can recompute; pass --coordinator-key to check "
                "its MACs",
                soft_wrap=True,
            )
        problems += [f"{AUDIT_FILE} {problem}" for problem in verify_chain(audit, mac_key)]
        problems += _cross_check(registry, read_entries(audit))
    for warning in registry.leftovers():
        console.print(f"[yellow]warning[/]: {warning}", soft_wrap=True)
    for problem in problems:
        console.print(f"[red]problem[/]: {problem}", soft_wrap=True)
    count = sum(len(registry.versions(m)) for m in registry.modules())
    if problems:
        console.print(f"[red]FAILED[/]: {len(problems)} problem(s) in {args.run_dir}")
        return 1
    what = f"{count} version(s) of {len(registry.modules())} module(s)"
    base = f"; base fingerprint {fingerprint[:12]} matches" if fingerprint else ""
    chain = "audit chain intact" if audit.is_file() else f"no {AUDIT_FILE}"
    console.print(
        f"[green]OK[/]: {what}: hashes, manifests, lineage{base}; {chain}", soft_wrap=True
    )
    return 0


def _cross_check(registry: Registry, entries: list[dict[str, Any]]) -> list[str]:
    """Every version has its ``version-published`` audit entry with the same SHA-256, and back."""
    logged = {
        (str(e.get("module")), e.get("version")): e.get("sha256")
        for e in entries
        if e.get("event") == EVENT_VERSION_PUBLISHED
    }
    problems = []
    for module in registry.modules():
        for entry in registry.versions(module):
            key = (module, entry.version)
            try:
                sha = entry.manifest["sha256"][ADAPTER_FILE]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # verify reports the manifest itself
            if key not in logged:
                problems.append(f"{entry.name}: no {EVENT_VERSION_PUBLISHED} entry in {AUDIT_FILE}")
            elif logged[key] != sha:
                problems.append(f"{entry.name}: {AUDIT_FILE} logs SHA-256 {logged[key]}, not {sha}")
    for module, version in sorted(set(logged) - _all_keys(registry), key=str):
        problems.append(f"{AUDIT_FILE}: logs {module}/v{version} published, not in the registry")
    return problems


def _all_keys(registry: Registry) -> set[tuple[str, Any]]:
    return {(m, e.version) for m in registry.modules() for e in registry.versions(m)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedlora.registry_cli ACTION ...``: the same as ``fedlora registry ACTION``."""
    parser = argparse.ArgumentParser(
        prog="fedlora registry",
        description="List, show, export and verify a run's adapter versions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_registry_actions(parser)
    return run_registry(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
