"""The adapter registry: every global adapter version as a PEFT folder plus a manifest.

``<root>/<module>/v<NNNN>/`` holds ``adapter_model.safetensors`` and ``adapter_config.json``
(``PeftModel.from_pretrained(base, path)`` loads it; ``base_model_name_or_path`` is the base's
portable name, an alias or hub id, never a local path), ``manifest.json`` (lineage, metrics,
base fingerprint, SHA-256 of the tensors) and ``README.md``, the model card
(``server.model_card``; not hashed: exports rewrite it with the round's metrics). A version is
built in a hidden temp folder (``.v<NNNN>.<random>``) and renamed into place, so a crash never
leaves a half-written version visible, and an existing version is never overwritten.

``verify`` checks a whole registry (hashes, manifests, lineage, base fingerprint); ``export``,
``export_many`` and ``export_merged`` (``server.registry_export``) write verified PEFT folders
elsewhere, just as atomically.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atomic import fsync_dir, whole_write, write_json_atomic
from common.errors import RegistryError
from common.model_names import portable_model_name
from common.scopes import MODULE_NAME
from server.model_card import CARD_FILE, model_card

if TYPE_CHECKING:
    # Type names only: `fedlora registry list` and `report` read manifests without torch or peft
    # (seconds of imports on a small machine); the methods that move tensors import them.
    from peft import LoraConfig

    from common.adapters import AdapterState
    from server.registry_export import BaseModelLike, Combination, Selection

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# Every file of a version that its manifest hashes: the tensors and the LoRA config, which peft
# reads to apply them (an edited rank, alpha or target list changes what the adapter does).
HASHED_FILES = (ADAPTER_FILE, CONFIG_FILE)
MANIFEST_FILE = "manifest.json"
_TEMP_VERSION = re.compile(r"\.v\d{4}\..+")  # what publish's mkdtemp names look like


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


class Registry:
    """Versions of each module under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def module_dir(self, module: str) -> Path:
        """``<root>/<module>``; RegistryError for a name that is not a module name (``/etc``,
        ``..``), which would put the folder outside the registry."""
        if not MODULE_NAME.fullmatch(module):
            raise RegistryError(f"{module[:80]!r} is not a module name (lowercase, digits, - or _)")
        return self.root / module

    def modules(self) -> list[str]:
        """The modules with a folder in the registry, sorted (hidden folders left out)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name[0] != ".")

    def versions(self, module: str) -> list[RegistryVersion]:
        folder = self.module_dir(module)
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            name = child.name
            if child.is_dir() and name.startswith("v") and name[1:].isdigit():
                found.append(RegistryVersion(module, int(name[1:]), child))
        return sorted(found, key=lambda v: v.version)

    def latest(self, module: str) -> RegistryVersion | None:
        versions = self.versions(module)
        return versions[-1] if versions else None

    def get(self, module: str, version: int | None = None) -> RegistryVersion:
        """One version of ``module`` (None: the latest); a RegistryError names what exists."""
        versions = self.versions(module)
        if not versions:
            known = ", ".join(self.modules()) or "none"
            raise RegistryError(f"{self.root}: no module {module!r} (modules: {known})")
        if version is None:
            return versions[-1]
        for candidate in versions:
            if candidate.version == version:
                return candidate
        numbers = ", ".join(str(v.version) for v in versions)
        raise RegistryError(f"{module}: no version {version} (versions: {numbers})")

    @whole_write
    def publish(
        self,
        module: str,
        state: AdapterState,
        lora: LoraConfig,
        manifest: dict[str, Any],
        number: int | None = None,
    ) -> RegistryVersion:
        """Write the next version of ``module`` (or version ``number``) atomically; return it.

        ``number`` is for a site's registry, which holds the coordinator's version numbers
        (with gaps where it missed a round); its parent is ``number - 1``.
        """
        latest = self.latest(module)
        if number is None:
            number = 0 if latest is None else latest.version + 1
            parent = None if latest is None else latest.version
        else:
            parent = None if number == 0 else number - 1
        final = self.module_dir(module) / f"v{number:04d}"
        final.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file  # imports torch: see the imports above

        tmp = Path(tempfile.mkdtemp(prefix=f".v{number:04d}.", dir=final.parent))
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
            portable_lora(lora, manifest.get("base_model")).save_pretrained(str(tmp))
            full = {
                **manifest,
                "module": module,
                "version": number,
                "parent": parent,
                "created": utc_stamp(),
                "sha256": {name: sha256_file(tmp / name) for name in HASHED_FILES},
            }
            write_json_atomic(tmp / MANIFEST_FILE, full)
            card = model_card(full, task_type=_task_type(lora))
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
            for name in (ADAPTER_FILE, CONFIG_FILE, CARD_FILE):
                fsync_file(tmp / name)
            if final.exists():
                raise RegistryError(f"{final} already exists; versions are never overwritten")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(final.parent)
        return RegistryVersion(module, number, final)

    def load(self, module: str, version: int) -> AdapterState:
        """Load a version's tensors after checking them against the manifest's SHA-256."""
        path = self.module_dir(module) / f"v{version:04d}"
        manifest, problem = _read_json(path / MANIFEST_FILE)
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

    def verify(self, module: str | None = None, model_fingerprint: str | None = None) -> list[str]:
        """Check every version of ``module`` (None: of every module).

        Checks that each manifest exists, parses and names its own module and version; that the
        tensors' SHA-256 matches the manifest; that ``adapter_config.json`` parses as a LoRA
        config; that versions run v0000, v0001, ... without gaps, each naming the one before
        as its parent; and, when ``model_fingerprint`` is given, that every manifest's
        ``base_fingerprint`` equals it. Leftover temp folders are warnings: see ``leftovers``.

        Returns
        -------
        list of str
            One line per problem, naming ``<module>/v<NNNN>``; empty when the registry is sound.

        Raises
        ------
        RegistryError
            When the registry folder or the named module does not exist.
        """
        if not self.root.is_dir():
            raise RegistryError(f"{self.root}: no registry folder")
        modules = self.modules() if module is None else [self.get(module).module]
        problems: list[str] = []
        for name in modules:
            versions = self.versions(name)
            problems += _lineage_problems(name, versions)
            for entry in versions:
                problems += version_problems(entry, model_fingerprint)
        return problems

    def leftovers(self, module: str | None = None) -> list[str]:
        """Warnings for hidden ``.v<NNNN>.*`` temp folders that an interrupted publish left.

        A complete one (with a manifest) was written but never renamed into place; neither kind
        is a version, and both are safe to delete once no publish is running.
        """
        found = []
        for name in self.modules() if module is None else [module]:
            folder = self.module_dir(name)
            for child in sorted(folder.iterdir()) if folder.is_dir() else []:
                if child.is_dir() and _TEMP_VERSION.fullmatch(child.name):
                    complete = (child / MANIFEST_FILE).is_file()
                    kind = "complete, never renamed" if complete else "incomplete"
                    found.append(f"{name}/{child.name}: leftover temp folder of a publish ({kind})")
        return found

    # The exports live in server.registry_export, which imports this module: import it here.
    def export(self, module: str, version: int | None, out_dir: Path) -> Path:
        """Copy one version's PEFT folder to ``out_dir``: ``registry_export.export``."""
        from server.registry_export import export

        return export(self, module, version, out_dir)

    def export_many(self, selection: Selection, out_dir: Path) -> Path:
        """Export several modules as ``out_dir/<module>/``: ``registry_export.export_many``."""
        from server.registry_export import export_many

        return export_many(self, selection, out_dir)

    def export_merged(
        self,
        selection: Selection,
        out_dir: Path,
        base: BaseModelLike,
        weights: Sequence[float] | None = None,
        combination_type: Combination = "cat",
        svd_rank: int | None = None,
    ) -> Path:
        """Merge several modules into one LoRA adapter: ``registry_export.export_merged``."""
        from server.registry_export import export_merged

        return export_merged(self, selection, out_dir, base, weights, combination_type, svd_rank)


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


def find_registry(path: Path) -> Registry:
    """The registry at ``path``: a run folder (``path/registry``) or a registry folder itself.

    A registry folder holds module folders of ``v<NNNN>`` versions; anything else is a
    RegistryError naming the path.
    """
    if not path.is_dir():
        raise RegistryError(f"{path}: no such folder (expected a run folder or its registry/)")
    if (path / "registry").is_dir():
        return Registry(path / "registry")
    registry = Registry(path)
    if not any(registry.versions(m) for m in registry.modules() if MODULE_NAME.fullmatch(m)):
        raise RegistryError(
            f"{path}: holds no fedlora registry (neither a registry/ folder nor module folders "
            "with v0000, v0001, ... versions)"
        )
    return registry


def utc_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
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


def _lineage_problems(module: str, versions: list[RegistryVersion]) -> list[str]:
    """Gaps in v0000, v0001, ... (parents are checked per version)."""
    present = {v.version for v in versions}
    last = max(present, default=-1)
    gaps = [n for n in range(last) if n not in present]
    return [f"{module}/v{n:04d}: missing (gap in the lineage)" for n in gaps]


def version_problems(entry: RegistryVersion, fingerprint: str | None) -> list[str]:
    """Every problem of one version folder, each prefixed with ``<module>/v<NNNN>``."""
    problems: list[str] = []
    manifest, problem = _read_json(entry.path / MANIFEST_FILE)
    config, config_problem = _read_json(entry.path / CONFIG_FILE)
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


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
