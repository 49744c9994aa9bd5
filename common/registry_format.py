"""The on-disk format of one adapter version: a PEFT folder plus a manifest, written atomically.

``<module>/v<NNNN>/`` holds ``adapter_model.safetensors`` and ``adapter_config.json``
(``PeftModel.from_pretrained(base, path)`` loads it; ``base_model_name_or_path`` is the base's
portable name, an alias or hub id, never a local path), ``manifest.json`` (lineage, metrics,
base fingerprint, SHA-256 of the tensors and the LoRA config) and ``README.md``, the model card
(``common.model_card``; not hashed: exports rewrite it with the round's metrics). A version is
built in a hidden temp folder (``.v<NNNN>.<random>``) and renamed into place, so a crash never
leaves a half-written version visible, and an existing version is never overwritten.

The coordinator's registry and a site's store both write and read versions through
``common.registry``, which holds them in this format; ``version_problems`` is the check of one
version that ``verify`` and every export run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atomic import fsync_dir, fsync_path, whole_write, write_json_atomic
from common.errors import RegistryError
from common.model_card import CARD_FILE, model_card
from common.model_names import portable_model_name

if TYPE_CHECKING:
    # Type names only: `fedlora registry list` and `report` read manifests without torch or peft
    # (seconds of imports on a small machine); the functions that move tensors import them.
    from peft import LoraConfig

    from common.adapters import AdapterState

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# Every file of a version that its manifest hashes: the tensors and the LoRA config, which peft
# reads to apply them (an edited rank, alpha or target list changes what the adapter does).
HASHED_FILES = (ADAPTER_FILE, CONFIG_FILE)
MANIFEST_FILE = "manifest.json"
TEMP_VERSION = re.compile(r"\.v\d{4}\..+")  # what write_version's mkdtemp names look like


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def utc_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class RegistryVersion:
    """One published version of one module: ``<root>/<module>/v<NNNN>``."""

    module: str
    version: int
    path: Path

    @property
    def name(self) -> str:
        return f"{self.module}/v{self.version:04d}"

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST_FILE).read_text(encoding="utf-8"))


def portable_lora(lora: LoraConfig, base_model: Any) -> LoraConfig:
    """A copy of ``lora`` whose ``base_model_name_or_path`` is the base's portable name (alias
    or hub id), or None: peft fills in the folder the base was loaded from, which is a path on
    this machine and means nothing elsewhere."""
    config = copy.copy(lora)  # the caller's config is shared (one per module): never edit it
    config.base_model_name_or_path = portable_model_name(str(base_model)) if base_model else None
    return config


def _task_type(lora: LoraConfig) -> str | None:
    task = getattr(lora, "task_type", None)
    return None if task is None else str(getattr(task, "value", task))


@whole_write
def write_version(
    final: Path, state: AdapterState, lora: LoraConfig, manifest: dict[str, Any]
) -> None:
    """Write the version folder ``final`` (``<module>/v<NNNN>``) atomically.

    ``manifest`` gets the creation time and the SHA-256 of ``HASHED_FILES``; the model card is
    written from it. RegistryError if ``final`` exists: versions are never overwritten.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file  # imports torch: see the imports above

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        portable_lora(lora, manifest.get("base_model")).save_pretrained(str(tmp))
        full = {
            **manifest,
            "created": utc_stamp(),
            "sha256": {name: sha256_file(tmp / name) for name in HASHED_FILES},
        }
        write_json_atomic(tmp / MANIFEST_FILE, full)
        card = model_card(full, task_type=_task_type(lora))
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        for name in (ADAPTER_FILE, CONFIG_FILE, CARD_FILE):
            fsync_path(tmp / name)
        if final.exists():
            raise RegistryError(f"{final} already exists; versions are never overwritten")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def read_verified(path: Path) -> AdapterState:
    """Load a version folder's tensors after checking them against the manifest's SHA-256."""
    manifest, problem = read_json(path / MANIFEST_FILE)
    if manifest is None:
        raise RegistryError(f"{path}: {problem}")
    expected = (
        manifest.get("sha256", {}).get(ADAPTER_FILE)
        if isinstance(manifest.get("sha256"), dict)
        else None
    )
    if not isinstance(expected, str):
        raise RegistryError(f"{path}: manifest has no sha256 of {ADAPTER_FILE}")
    if not (path / ADAPTER_FILE).is_file():
        raise RegistryError(f"{path}: missing {ADAPTER_FILE}")
    actual = sha256_file(path / ADAPTER_FILE)
    if actual != expected:
        raise RegistryError(
            f"{path / ADAPTER_FILE}: SHA-256 {actual} does not match the manifest's {expected}"
        )
    from safetensors.torch import load_file  # imports torch: see the imports above

    return load_file(str(path / ADAPTER_FILE))


def read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` or ``(None, problem)`` for a JSON file that should hold an object."""
    if not path.is_file():
        return None, f"missing {path.name}"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return None, f"{path.name} does not parse: {type(exc).__name__}"
    if not isinstance(value, dict):
        return None, f"{path.name} is not a JSON object"
    return value, None


def recorded_sha256(entry: RegistryVersion) -> Any:
    sha = entry.manifest.get("sha256")
    return sha.get(ADAPTER_FILE) if isinstance(sha, dict) else None


def lineage_problems(module: str, versions: list[RegistryVersion]) -> list[str]:
    """Gaps in v0000, v0001, ... (parents are checked per version)."""
    present = {v.version for v in versions}
    last = max(present, default=-1)
    gaps = [n for n in range(last) if n not in present]
    return [f"{module}/v{n:04d}: missing (gap in the lineage)" for n in gaps]


def version_problems(entry: RegistryVersion, fingerprint: str | None) -> list[str]:
    """Every problem of one version folder, each prefixed with ``<module>/v<NNNN>``."""
    problems: list[str] = []
    manifest, problem = read_json(entry.path / MANIFEST_FILE)
    config, config_problem = read_json(entry.path / CONFIG_FILE)
    problems += [p for p in (problem, config_problem) if p is not None]
    if config is not None and config.get("peft_type") != "LORA":
        problems.append(f"{CONFIG_FILE}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    if manifest is not None:
        problems += _manifest_problems(entry, manifest, fingerprint)
    return [f"{entry.name}: {p}" for p in problems]


def _manifest_problems(
    entry: RegistryVersion, manifest: dict[str, Any], fingerprint: str | None
) -> list[str]:
    problems = []
    for key, value in (("module", entry.module), ("version", entry.version)):
        if manifest.get(key) != value:
            problems.append(f"manifest {key} is {manifest.get(key)!r}, the folder says {value!r}")
    parent = None if entry.version == 0 else entry.version - 1
    if manifest.get("parent", "absent") != parent:
        problems.append(f"parent is {manifest.get('parent', 'absent')!r}, expected {parent!r}")
    sha = manifest.get("sha256")
    for name in HASHED_FILES:
        expected = sha.get(name) if isinstance(sha, dict) else None
        if expected is None:
            problems.append(f"manifest records no sha256 of {name}")
        elif not (entry.path / name).is_file():
            problems.append(f"missing {name}")
        elif (actual := sha256_file(entry.path / name)) != expected:
            problems.append(f"{name} SHA-256 {actual} does not match the manifest's {expected}")
    recorded = manifest.get("base_fingerprint")
    if fingerprint is not None and recorded != fingerprint:
        problems.append(
            f"base fingerprint {recorded} (manifest) differs from the model's {fingerprint}"
            if recorded
            else f"manifest records no base_fingerprint (the model's is {fingerprint})"
        )
    return problems
