"""``fedlora registry check-base REGISTRY --model NAME [--set model.KEY=VALUE]``.

Loads the new base model and checks every module's latest registered version against it
(``server.base_fit``): its LoRA targets exist, its tensors' shapes fit, and both fingerprints
(the base it was trained on, from its manifest, and the new one). Exit 0 when every module
fits, 1 with one ``misfit:`` line per problem otherwise, 2 for an error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from common.config import ModelConfig, parse_override, validate_config
from common.errors import FedloraError, RegistryError
from common.progress import console
from common.registry import Registry, find_registry
from common.registry_format import ADAPTER_FILE
from fedlora.help_text import doc_after_title

if TYPE_CHECKING:
    from server.base_fit import ModuleFit

# Tensors whose first dimension is the number of classes (transformers' classification heads).
_HEAD_SUFFIXES = ("score.weight", "classifier.weight", "classifier.out_proj.weight")


class CheckBaseUsageError(FedloraError):
    """An override that is not ``model.KEY=VALUE``, or a model section that does not validate."""


def add_check_base(actions: Any) -> None:
    """Add ``check-base`` to ``fedlora registry``'s actions."""
    parser = actions.add_parser(
        "check-base",
        help="does every module's latest version fit a new base model? (targets, shapes)",
        description=doc_after_title(__doc__),
    )
    parser.add_argument(
        "registry", type=Path, metavar="REGISTRY", help="a run folder or its registry/ folder"
    )
    parser.add_argument(
        "--model", required=True, metavar="NAME", help="the new base (alias, folder, .gguf)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="model.KEY=VALUE",
        help="a model setting of the new base, e.g. --set model.seed=1 (repeatable); the rest "
        "comes from the run's config.json where the registry has one",
    )
    parser.add_argument(
        "--num-labels", type=int, help="classification head size (default: from the adapter)"
    )


def new_base_config(registry: Registry, name: str, overrides: list[str]) -> ModelConfig:
    """The run's model section (task, seed, ...), then ``--model`` and ``--set model.*``."""
    saved: dict[str, Any] = {}
    for config in (registry.root.parent / "config.json", registry.root / "config.json"):
        if config.is_file():
            saved = json.loads(config.read_text(encoding="utf-8")).get("model", {}) or {}
            break
    raw = {**saved, "name": name, "device": saved.get("device", "cpu")}
    if raw.get("quantize", "none") == "none":
        raw.update(device="cpu", dtype="float32")  # the fingerprint does not depend on either
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 2 or path[0] != "model":
            raise CheckBaseUsageError(f"--set {text!r}: check-base takes model.KEY=VALUE only")
        raw[path[1]] = value
    return validate_config(ModelConfig, raw, "--model/--set")


def _head_classes(registry: Registry) -> int | None:
    """The class count of a classification head saved with an adapter (modules_to_save)."""
    for module in registry.modules():
        latest = registry.latest(module)
        if latest is None:
            continue
        with safe_open(str(latest.path / ADAPTER_FILE), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if "lora_" not in key and key.endswith(_HEAD_SUFFIXES):
                    return int(handle.get_slice(key).get_shape()[0])
    return None


def _describe(fit: ModuleFit) -> str:
    recorded = fit.recorded_fingerprint or "(not recorded)"
    same = "the same base" if fit.same_base else "a different base"
    verdict = "fits" if fit.fits else f"does NOT fit ({len(fit.misfits)} misfit(s))"
    return (
        f"{fit.name}: {verdict}; targets {', '.join(fit.targets)}, {fit.tensors} tensor(s); "
        f"trained on base {recorded}, new base {fit.new_fingerprint}: {same}"
    )


def run_check_base(args: argparse.Namespace) -> int:
    """Check the registry against the new base; print one line per module and per misfit."""
    # torch and transformers: only when check-base runs, not for `fedlora registry list`.
    from common.models import load_base
    from server.base_fit import check_base

    registry = find_registry(args.registry)
    cfg = new_base_config(registry, args.model, args.overrides)
    labels = args.num_labels
    if cfg.task == "classification" and labels is None:
        labels = _head_classes(registry)
    base = load_base(cfg, num_labels=labels)
    fits = check_base(registry, base.model, base.fingerprint)
    if not fits:
        raise RegistryError(f"{registry.root}: no registered version to check")
    for fit in fits:
        console.print(_describe(fit), soft_wrap=True, highlight=False)
    misfits = [f"misfit: {fit.name}: {line}" for fit in fits for line in fit.misfits]
    for line in misfits:
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    if misfits:
        return 1
    console.print(f"every module ({len(fits)}) fits {cfg.name}", highlight=False)
    return 0
