"""Exports out of the adapter registry: verified PEFT folders written elsewhere, atomically.

``export`` copies one version, ``export_many`` several modules side by side, and
``export_merged`` merges several modules into one LoRA adapter with peft's
``add_weighted_adapter``. Every export is built in a hidden temp folder beside ``out_dir`` and
renamed into place once fsynced; it never overwrites anything. They read a coordinator's
registry or a site's alike (``common.registry``).

Every exported folder is what ``huggingface_hub``'s ``upload_folder`` takes as it is: the PEFT
files, with the base's portable name (alias or hub id) as ``base_model_name_or_path``, a model
card ``README.md`` (``common.model_card``, with the round's metrics from the run's
``metrics.jsonl``) and ``manifest.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from common.adapters import AdapterState
from common.atomic import fsync_dir, fsync_path, write_json_atomic
from common.errors import RegistryError
from common.model_card import CARD_FILE, model_card, round_metrics
from common.model_names import portable_model_name
from common.registry import Registry
from common.registry_format import (
    ADAPTER_FILE,
    CONFIG_FILE,
    MANIFEST_FILE,
    RegistryVersion,
    recorded_sha256,
    sha256_file,
    utc_stamp,
    version_problems,
)

# Names of the adapters inside the peft model that export_merged builds (never saved).
_MERGE_INPUT = "fedlora_in_{}"
_MERGED = "fedlora_merged"

# Which modules and versions to export: {module: version, or None for the latest}.
Selection = Mapping[str, int | None] | Sequence[tuple[str, int | None]]
Combination = Literal["cat", "svd"]


class BaseModelLike(Protocol):
    """What ``export_merged`` needs of a base: ``common.models.LoadedBase`` fits."""

    model: Any  # a transformers PreTrainedModel without adapters
    fingerprint: str


def export(registry: Registry, module: str, version: int | None, out_dir: Path) -> Path:
    """Copy one version's PEFT folder (and manifest) to ``out_dir``, verified, atomically.

    ``out_dir`` must not exist or be empty. ``PeftModel.from_pretrained(base, out_dir)``
    loads the result.
    """
    entry = registry.get(module, version)
    with _staging(out_dir) as tmp:
        _copy_version(entry, tmp)
    return out_dir


def export_many(registry: Registry, selection: Selection, out_dir: Path) -> Path:
    """Export several modules as ``out_dir/<module>/`` PEFT folders, in one atomic step.

    Load them as named adapters of one model: ``PeftModel.from_pretrained(base,
    out_dir / first, adapter_name=first)`` then ``model.load_adapter(out_dir / other,
    adapter_name=other)`` for the others.
    """
    entries = _select(registry, selection)
    with _staging(out_dir) as tmp:
        for entry in entries:
            (tmp / entry.module).mkdir()
            _copy_version(entry, tmp / entry.module)
    return out_dir


def export_merged(
    registry: Registry,
    selection: Selection,
    out_dir: Path,
    base: BaseModelLike,
    weights: Sequence[float] | None = None,
    combination_type: Combination = "cat",
    svd_rank: int | None = None,
) -> Path:
    """Merge several modules into ONE LoRA adapter with peft's ``add_weighted_adapter``.

    ``"cat"`` stacks the factors: the merged delta is exactly ``sum_i weights[i] *
    scaling_i * B_i @ A_i`` at rank ``sum_i r_i`` (weights 1, the default, behave like the
    modules active together). ``"svd"`` truncates that sum to rank ``svd_rank`` (default:
    the largest input rank): smaller, approximate. Only LoRA factors merge: a module with
    ``modules_to_save`` (a classification head) is refused; use ``export_many`` for it.

    Parameters
    ----------
    selection
        ``{module: version or None (latest)}``, in merge order.
    out_dir : Path
        Gets the PEFT files and a manifest listing the inputs, their SHA-256 and weights.
    base : BaseModelLike
        A freshly loaded base (``common.models.load_base``) with the fingerprint that every
        input's manifest records. LoRA layers are injected into it and removed afterwards.
    weights : sequence of float, optional
        One per module; default 1.0 each.
    combination_type : {"cat", "svd"}
    svd_rank : int, optional

    Raises
    ------
    RegistryError
        For an unknown module or version, a failed check, a fingerprint mismatch or inputs
        that peft cannot merge.
    """
    entries = _select(registry, selection)
    weights = [1.0] * len(entries) if weights is None else [float(w) for w in weights]
    if len(weights) != len(entries):
        raise RegistryError(f"{len(weights)} weights for {len(entries)} modules")
    if combination_type not in ("cat", "svd"):
        raise RegistryError(f"combination_type {combination_type!r}: expected 'cat' or 'svd'")
    for entry in entries:
        _check_mergeable(entry, base.fingerprint)
    state, config = _merge(entries, base.model, weights, combination_type, svd_rank)
    base_model = entries[0].manifest.get("base_model")
    config.base_model_name_or_path = portable_model_name(str(base_model)) if base_model else None
    sources = [
        {"module": e.module, "version": e.version, "weight": w, "sha256": recorded_sha256(e)}
        for e, w in zip(entries, weights, strict=True)
    ]
    with _staging(out_dir) as tmp:
        save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        manifest = {
            "merged_from": sources,
            "combination_type": combination_type,
            "rank": config.r,
            "base_fingerprint": base.fingerprint,
            "created": utc_stamp(),
            "sha256": {ADAPTER_FILE: sha256_file(tmp / ADAPTER_FILE)},
        }
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
        title = "merged " + " + ".join(f"{e.module} v{e.version:04d}" for e in entries)
        facts = {**entries[0].manifest, "module": "+".join(e.module for e in entries)}
        card = model_card(facts, task_type=_task_type(tmp / CONFIG_FILE), title=title)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    return out_dir


def _task_type(config_file: Path) -> str | None:
    task = json.loads(config_file.read_text(encoding="utf-8")).get("task_type")
    return task if isinstance(task, str) else None


def _select(registry: Registry, selection: Selection) -> list[RegistryVersion]:
    pairs = list(selection.items()) if isinstance(selection, Mapping) else list(selection)
    if not pairs:
        raise RegistryError("no modules selected for export")
    names = [module for module, _ in pairs]
    if len(set(names)) != len(names):
        raise RegistryError(f"modules selected twice: {names}")
    return [registry.get(module, version) for module, version in pairs]


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A temp folder beside ``out_dir``, renamed to it once the block finishes (all fsynced).

    ``out_dir`` must not exist or be empty: an export never overwrites anything.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RegistryError(f"{out_dir} exists and is not empty; exports never overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is an ordinary folder
        for path in sorted(tmp.rglob("*"), reverse=True):
            fsync_path(path)
        os.rename(tmp, out_dir)  # replaces an empty folder; fails on a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)


def _copy_version(entry: RegistryVersion, target: Path) -> None:
    """Copy a version's files, check the copied tensors against the manifest, and write its
    model card with the round's metrics (the run folder's ``metrics.jsonl``, when present)."""
    problems = version_problems(entry, None)
    if problems:
        raise RegistryError("; ".join(problems))
    for name in (ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE):
        shutil.copyfile(entry.path / name, target / name)
    expected, actual = recorded_sha256(entry), sha256_file(target / ADAPTER_FILE)
    if actual != expected:  # changed while we copied it
        raise RegistryError(f"{entry.name}: copied tensors hash to {actual}, expected {expected}")
    manifest = entry.manifest
    _make_config_portable(target, manifest)
    run_dir = entry.path.parent.parent.parent  # <run>/registry/<module>/v<NNNN>
    card = model_card(
        manifest, round_metrics(run_dir, entry.version), _task_type(target / CONFIG_FILE)
    )
    (target / CARD_FILE).write_text(card, encoding="utf-8")


def _make_config_portable(target: Path, manifest: dict[str, Any]) -> None:
    """A version published before configs recorded the portable base name may name a local
    folder: export the portable name (or none), and rehash the copied manifest to match."""
    config = json.loads((target / CONFIG_FILE).read_text(encoding="utf-8"))
    base = manifest.get("base_model")
    portable = portable_model_name(str(base)) if base else None
    if config.get("base_model_name_or_path") == portable:
        return
    config["base_model_name_or_path"] = portable
    write_json_atomic(target / CONFIG_FILE, config)
    sha = dict(manifest.get("sha256") or {})
    sha[CONFIG_FILE] = sha256_file(target / CONFIG_FILE)
    note = "base_model_name_or_path rewritten to the portable base name on export"
    write_json_atomic(target / MANIFEST_FILE, {**manifest, "sha256": sha, "export_note": note})


def _check_mergeable(entry: RegistryVersion, fingerprint: str) -> None:
    problems = version_problems(entry, fingerprint)
    if problems:
        raise RegistryError("; ".join(problems))
    config = json.loads((entry.path / CONFIG_FILE).read_text(encoding="utf-8"))
    with safe_open(str(entry.path / ADAPTER_FILE), framework="pt") as handle:
        keys = list(handle.keys())
    if config.get("modules_to_save") or any("lora_" not in key for key in keys):
        raise RegistryError(
            f"{entry.name}: holds tensors besides LoRA factors (modules_to_save, e.g. a "
            "classification head), which add_weighted_adapter cannot merge; use export_many"
        )


def _merge(
    entries: list[RegistryVersion],
    model: Any,
    weights: list[float],
    combination_type: Combination,
    svd_rank: int | None,
) -> tuple[AdapterState, LoraConfig]:
    """The merged adapter's tensors (peft key names, CPU) and config; ``model`` is restored."""
    names = [_MERGE_INPUT.format(i) for i in range(len(entries))]
    peft_model = PeftModel.from_pretrained(model, str(entries[0].path), adapter_name=names[0])
    try:
        for name, entry in zip(names[1:], entries[1:], strict=True):
            peft_model.load_adapter(str(entry.path), adapter_name=name)
        try:
            peft_model.add_weighted_adapter(
                names, weights, _MERGED, combination_type=combination_type, svd_rank=svd_rank
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            raise RegistryError(f"peft cannot merge {[e.name for e in entries]}: {exc}") from exc
        # Only LoRA factors merge (_check_mergeable), never whole embedding layers; "auto"
        # would look the portable base name up on the hub to compare vocabulary sizes.
        state = get_peft_model_state_dict(
            peft_model, adapter_name=_MERGED, save_embedding_layers=False
        )
        config = peft_model.peft_config[_MERGED]
        if not isinstance(config, LoraConfig):  # add_weighted_adapter copies a LoraConfig
            raise RegistryError(f"merged config is a {type(config).__name__}, not a LoraConfig")
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        return tensors, config
    finally:
        peft_model.unload()  # swaps the original modules back into ``model``
