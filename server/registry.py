"""The adapter registry: every global adapter version as a PEFT folder plus a manifest.

``<root>/<module>/v<NNNN>/`` holds ``adapter_model.safetensors`` and ``adapter_config.json``
(``PeftModel.from_pretrained(base, path)`` loads it) and ``manifest.json`` (lineage, metrics,
base fingerprint, SHA-256 of the tensors). A version is built in a hidden temp folder and
renamed into place, so a crash never leaves a half-written version visible, and an existing
version is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import LoraConfig
from safetensors.torch import load_file, save_file

from common.adapters import AdapterState
from common.atomic import fsync_dir, write_json_atomic
from common.errors import RegistryError

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class RegistryVersion:
    module: str
    version: int
    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST_FILE).read_text(encoding="utf-8"))


class Registry:
    """Versions of each module under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def module_dir(self, module: str) -> Path:
        return self.root / module

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
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
