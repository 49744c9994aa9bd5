"""The adapter registry: every global adapter version as a PEFT folder plus a manifest.

``<root>/<module>/v<NNNN>/`` holds ``adapter_model.safetensors`` and ``adapter_config.json``
(``PeftModel.from_pretrained(base, path)`` loads it) and ``manifest.json`` (lineage, metrics,
base fingerprint, SHA-256 of the tensors). A version is built in a hidden temp folder
(``.v<NNNN>.<random>``) and renamed into place, so a crash never leaves a half-written version
visible, and an existing version is never overwritten.

``verify`` checks a whole registry (hashes, manifests, lineage, base fingerprint); ``export``,
``export_many`` and ``export_merged`` write verified PEFT folders elsewhere, just as atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.adapters import AdapterState
from common.atomic import fsync_dir, write_json_atomic
from common.errors import RegistryError

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"
_TEMP_VERSION = re.compile(r"\.v\d{4}\..+")  # what publish's mkdtemp names look like
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

    def publish(
        self, module: str, state: AdapterState, lora: LoraConfig, manifest: dict[str, Any]
    ) -> RegistryVersion:
        """Write the next version of ``module`` atomically and return it."""
        latest = self.latest(module)
        number = 0 if latest is None else latest.version + 1
        final = self.module_dir(module) / f"v{number:04d}"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{number:04d}.", dir=final.parent))
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
            lora.save_pretrained(str(tmp))
            full = {
                **manifest,
                "module": module,
                "version": number,
                "parent": None if latest is None else latest.version,
                "created": _utc_stamp(),
                "sha256": {ADAPTER_FILE: sha256_file(tmp / ADAPTER_FILE)},
            }
            write_json_atomic(tmp / MANIFEST_FILE, full)
            for name in (ADAPTER_FILE, CONFIG_FILE):
                _fsync_file(tmp / name)
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
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise RegistryError(f"{path}: missing {MANIFEST_FILE}")
        expected = json.loads(manifest_path.read_text(encoding="utf-8"))["sha256"][ADAPTER_FILE]
        actual = sha256_file(path / ADAPTER_FILE)
        if actual != expected:
            raise RegistryError(
                f"{path / ADAPTER_FILE}: SHA-256 {actual} does not match the manifest's {expected}"
            )
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
                problems += _version_problems(entry, model_fingerprint)
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

    def export(self, module: str, version: int | None, out_dir: Path) -> Path:
        """Copy one version's PEFT folder (and manifest) to ``out_dir``, verified, atomically.

        ``out_dir`` must not exist or be empty. ``PeftModel.from_pretrained(base, out_dir)``
        loads the result.
        """
        entry = self.get(module, version)
        with _staging(out_dir) as tmp:
            _copy_version(entry, tmp)
        return out_dir

    def export_many(self, selection: Selection, out_dir: Path) -> Path:
        """Export several modules as ``out_dir/<module>/`` PEFT folders, in one atomic step.

        Load them as named adapters of one model: ``PeftModel.from_pretrained(base,
        out_dir / first, adapter_name=first)`` then ``model.load_adapter(out_dir / other,
        adapter_name=other)`` for the others.
        """
        entries = self._select(selection)
        with _staging(out_dir) as tmp:
            for entry in entries:
                (tmp / entry.module).mkdir()
                _copy_version(entry, tmp / entry.module)
        return out_dir

    def export_merged(
        self,
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
        entries = self._select(selection)
        weights = [1.0] * len(entries) if weights is None else [float(w) for w in weights]
        if len(weights) != len(entries):
            raise RegistryError(f"{len(weights)} weights for {len(entries)} modules")
        if combination_type not in ("cat", "svd"):
            raise RegistryError(f"combination_type {combination_type!r}: expected 'cat' or 'svd'")
        for entry in entries:
            _check_mergeable(entry, base.fingerprint)
        state, config = _merge(entries, base.model, weights, combination_type, svd_rank)
        sources = [
            {"module": e.module, "version": e.version, "weight": w, "sha256": _recorded_sha(e)}
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
                "created": _utc_stamp(),
                "sha256": {ADAPTER_FILE: sha256_file(tmp / ADAPTER_FILE)},
            }
            write_json_atomic(tmp / MANIFEST_FILE, manifest)
        return out_dir

    def _select(self, selection: Selection) -> list[RegistryVersion]:
        pairs = list(selection.items()) if isinstance(selection, Mapping) else list(selection)
        if not pairs:
            raise RegistryError("no modules selected for export")
        names = [module for module, _ in pairs]
        if len(set(names)) != len(names):
            raise RegistryError(f"modules selected twice: {names}")
        return [self.get(module, version) for module, version in pairs]


def _utc_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` or ``(None, problem)`` for a JSON file that should hold an object."""
    if not path.is_file():
        return None, f"missing {path.name}"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"{path.name} does not parse: {exc}"
    if not isinstance(value, dict):
        return None, f"{path.name} is not a JSON object"
    return value, None


def _recorded_sha(entry: RegistryVersion) -> Any:
    sha = entry.manifest.get("sha256")
    return sha.get(ADAPTER_FILE) if isinstance(sha, dict) else None


def _lineage_problems(module: str, versions: list[RegistryVersion]) -> list[str]:
    """Gaps in v0000, v0001, ... (parents are checked per version)."""
    present = {v.version for v in versions}
    last = max(present, default=-1)
    gaps = [n for n in range(last) if n not in present]
    return [f"{module}/v{n:04d}: missing (gap in the lineage)" for n in gaps]


def _version_problems(entry: RegistryVersion, fingerprint: str | None) -> list[str]:
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
    expected = sha.get(ADAPTER_FILE) if isinstance(sha, dict) else None
    if expected is None:
        problems.append(f"manifest records no sha256 of {ADAPTER_FILE}")
    elif not (entry.path / ADAPTER_FILE).is_file():
        problems.append(f"missing {ADAPTER_FILE}")
    elif (actual := sha256_file(entry.path / ADAPTER_FILE)) != expected:
        problems.append(f"{ADAPTER_FILE} SHA-256 {actual} does not match the manifest's {expected}")
    recorded = manifest.get("base_fingerprint")
    if fingerprint is not None and recorded != fingerprint:
        problems.append(
            f"base fingerprint {recorded} (manifest) differs from the model's {fingerprint}"
            if recorded
            else f"manifest records no base_fingerprint (the model's is {fingerprint})"
        )
    return problems


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
            _fsync_file(path)
        os.rename(tmp, out_dir)  # replaces an empty folder; fails on a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)


def _copy_version(entry: RegistryVersion, target: Path) -> None:
    """Copy a version's three files and check the copied tensors against the manifest."""
    problems = _version_problems(entry, None)
    if problems:
        raise RegistryError("; ".join(problems))
    for name in (ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE):
        shutil.copyfile(entry.path / name, target / name)
    expected, actual = _recorded_sha(entry), sha256_file(target / ADAPTER_FILE)
    if actual != expected:  # changed while we copied it
        raise RegistryError(f"{entry.name}: copied tensors hash to {actual}, expected {expected}")


def _check_mergeable(entry: RegistryVersion, fingerprint: str) -> None:
    problems = _version_problems(entry, fingerprint)
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
        state = get_peft_model_state_dict(peft_model, adapter_name=_MERGED)
        config = peft_model.peft_config[_MERGED]
        if not isinstance(config, LoraConfig):  # add_weighted_adapter copies a LoraConfig
            raise RegistryError(f"merged config is a {type(config).__name__}, not a LoraConfig")
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        return tensors, config
    finally:
        peft_model.unload()  # swaps the original modules back into ``model``


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
