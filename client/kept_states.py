"""Tensors a site keeps after each global version, newest few only: ``after-v<NNNN>.safetensors``.

A site keeps two kinds of state between rounds: what never leaves it (private modules, fedsa's
B factors: ``client.site_store``, folder ``kept``) and the up-link's quantisation residual
(error feedback: ``common.error_feedback``, folder ``residual``). Both are read by the version
or round they were made after: work on version v starts from the file with the largest
``NNNN < v``, so a round redone after a coordinator crash starts from exactly what the first
attempt started from (a resumed run stays bit-identical) and a restarted site loses nothing.
Without a folder (tests, in-process tools) the tensors live in memory. Light on imports: the
per-message ClientApp process of a deployed site uses it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load, save

from common.adapters import AdapterState
from common.atomic import write_bytes_atomic
from common.errors import StorageError

KEPT_FOLDER = "kept"  # what never leaves the site (client.site_store)
RESIDUAL_FOLDER = "residual"  # the up-link's quantisation residual (common.error_feedback)
# Files beyond the newest few are history nobody reads (the registry holds private modules).
KEEP_LAST = 3


class VersionedStates:
    """Adapter states by version number, ``<folder>/<prefix><NNNN>.safetensors``, written
    atomically; only the newest ``keep`` are kept. In memory when ``folder`` is None."""

    def __init__(self, folder: Path | None, prefix: str, keep: int) -> None:
        self.folder = folder
        self.prefix = prefix
        self.keep = keep
        self._name = re.compile(re.escape(prefix) + r"(\d{4,})\.safetensors")
        self._memory: dict[int, AdapterState] = {}

    def _path(self, version: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.prefix}{version:04d}.safetensors"

    def versions(self) -> list[int]:
        """The versions held, oldest first."""
        if self.folder is None:
            return sorted(self._memory)
        if not self.folder.is_dir():
            return []
        found = (self._name.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def read(self, version: int) -> AdapterState:
        """Version ``version`` as stored; ``KeyError`` if not held in memory, ``OSError`` or
        ``ValueError`` (``SafetensorError``) if its file is missing or unreadable."""
        if self.folder is None:
            return dict(self._memory[version])
        return load(self._path(version).read_bytes())

    def save(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        """Keep ``state`` as ``version`` (replacing a redone one); drop all but the newest."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        if self.folder is None:
            self._memory[version] = tensors
        else:
            write_bytes_atomic(self._path(version), save(tensors))
        for old in self.versions()[: -self.keep]:
            if self.folder is None:
                del self._memory[old]
            else:
                self._path(old).unlink(missing_ok=True)


class KeptStates(VersionedStates):
    """One kind of kept tensors of one site and run: in ``folder``, or in memory when None."""

    def __init__(self, folder: Path | None) -> None:
        super().__init__(folder, "after-v", KEEP_LAST)

    def load(self, before: int) -> AdapterState:
        """What was kept after the newest version ``< before`` ({} if none)."""
        candidates = [v for v in self.versions() if v < before]
        if not candidates:
            return {}
        try:
            return self.read(candidates[-1])
        except (OSError, ValueError) as exc:
            path = self._path(candidates[-1])
            raise StorageError(f"{path}: unreadable kept tensors ({exc})") from exc
