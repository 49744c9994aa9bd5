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
from pathlib import Path

from safetensors.torch import load, save

from common.adapters import AdapterState
from common.atomic import write_bytes_atomic
from common.errors import StorageError

KEPT_FOLDER = "kept"  # what never leaves the site (client.site_store)
RESIDUAL_FOLDER = "residual"  # the up-link's quantisation residual (common.error_feedback)
_NAME = re.compile(r"after-v(\d{4,})\.safetensors")
# Files beyond the newest few are history nobody reads (the registry holds private modules).
KEEP_LAST = 3


class KeptStates:
    """One kind of kept tensors of one site and run: in ``folder``, or in memory when None."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._memory: dict[int, AdapterState] = {}

    def _path(self, version: int) -> Path:
        assert self.folder is not None
        return self.folder / f"after-v{version:04d}.safetensors"

    def versions(self) -> list[int]:
        """The versions something was kept after, oldest first."""
        if self.folder is None:
            return sorted(self._memory)
        if not self.folder.is_dir():
            return []
        found = (_NAME.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, before: int) -> AdapterState:
        """What was kept after the newest version ``< before`` ({} if none)."""
        candidates = [v for v in self.versions() if v < before]
        if not candidates:
            return {}
        if self.folder is None:
            return dict(self._memory[candidates[-1]])
        path = self._path(candidates[-1])
        try:
            return load(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise StorageError(f"{path}: unreadable kept tensors ({exc})") from exc

    def save(self, version: int, state: AdapterState) -> None:
        """Keep ``state`` as made after ``version`` (replacing a redone one); drop old ones."""
        if self.folder is None:
            self._memory[version] = dict(state)
        else:
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            write_bytes_atomic(self._path(version), save(tensors))
        for old in self.versions()[:-KEEP_LAST]:
            if self.folder is None:
                del self._memory[old]
            else:
                self._path(old).unlink(missing_ok=True)
