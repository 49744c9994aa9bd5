"""A site's own store: the adapter versions it holds, and the tensors it keeps between rounds.

Each run has its own part, ``<root>/<run-id>/`` (``SiteStore.for_run``): two runs never share
kept tensors or version numbers, and a resumed run keeps its run id. Within it,
``registry/<module>/v<NNNN>/`` is the site-side registry (the same PEFT folder +
manifest layout as the coordinator's, so ``fedlora registry list|verify|export`` and
``fedlora generate --adapters`` read it): for every global version ``NNNN`` the site saw, each
module as this site uses it at that version: the shared and group modules it received, and
its private modules as it trained them. Versions the site missed are gaps.
``received/v<NNNN>.safetensors`` holds the newest global versions exactly as received and
checked (``client.received``), which the coordinator's steps and references build on.

``kept/after-v<NNNN>.safetensors`` holds what never leaves the site (private modules,
fedsa's B factors) after training on global version ``NNNN``. Training on, or evaluating,
version v starts from the file with the largest ``NNNN < v``: a round redone after a
coordinator crash starts from exactly what the first attempt started from, so a resumed run
stays bit-identical, and a restarted site loses nothing. Without a root (tests, in-process
tools) the kept tensors live in memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peft import LoraConfig
from safetensors.torch import load, save

from client.received import RECEIVED_FOLDER, ReceivedVersions
from client.round_claims import check_run_id, claim
from common.adapters import AdapterState
from common.atomic import write_bytes_atomic
from common.errors import StorageError
from common.registry import Registry

logger = logging.getLogger(__name__)

KEPT_FOLDER = "kept"
REGISTRY_FOLDER = "registry"
_KEPT_NAME = re.compile(r"after-v(\d{4,})\.safetensors")
# Kept files beyond the newest few are history the registry already holds (private modules).
KEEP_LAST = 3


class SiteStore:
    """One site's folder (``root``), or memory only when ``root`` is None."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._memory: dict[int, AdapterState] = {}
        self._runs: dict[str, SiteStore] = {}
        self._claimed: set[int] = set()
        self.registry = None if root is None else Registry(root / REGISTRY_FOLDER)
        # The global versions as received and verified (client.received): steps build on them.
        self.received = ReceivedVersions(None if root is None else root / RECEIVED_FOLDER)

    def for_run(self, run_id: str) -> SiteStore:
        """The part of this store that belongs to run ``run_id``: ``<root>/<run-id>/``."""
        check_run_id(run_id)
        if run_id not in self._runs:
            self._runs[run_id] = SiteStore(None if self.root is None else self.root / run_id)
        return self._runs[run_id]

    def claim_masked_input(self, server_round: int) -> None:
        """``client.round_claims.claim``: this run's ``server_round`` gets one masked input."""
        claim(self.root, server_round, self._claimed)

    def _kept_path(self, version: int) -> Path:
        assert self.root is not None
        return self.root / KEPT_FOLDER / f"after-v{version:04d}.safetensors"

    def _kept_versions(self) -> list[int]:
        if self.root is None:
            return sorted(self._memory)
        folder = self.root / KEPT_FOLDER
        if not folder.is_dir():
            return []
        found = (_KEPT_NAME.fullmatch(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load_kept(self, before: int) -> AdapterState:
        """What the site kept after training on the newest version ``< before`` ({} if none)."""
        candidates = [v for v in self._kept_versions() if v < before]
        if not candidates:
            return {}
        if self.root is None:
            return dict(self._memory[candidates[-1]])
        path = self._kept_path(candidates[-1])
        try:
            return load(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise StorageError(f"{path}: unreadable kept tensors ({exc})") from exc

    def save_kept(self, version: int, kept: AdapterState) -> None:
        """Store what the site keeps after training on ``version`` (replacing a redone one)."""
        if self.root is None:
            self._memory[version] = dict(kept)
        else:
            tensors = {k: v.detach().cpu().contiguous() for k, v in kept.items()}
            write_bytes_atomic(self._kept_path(version), save(tensors))
        for old in self._kept_versions()[:-KEEP_LAST]:
            if self.root is None:
                del self._memory[old]
            else:
                self._kept_path(old).unlink(missing_ok=True)

    def record(
        self,
        version: int,
        states: Mapping[str, AdapterState],
        loras: Mapping[str, LoraConfig],
        manifest: dict[str, Any],
        sources: Mapping[str, str],
    ) -> None:
        """Add each module's state at global ``version`` to the site registry, once."""
        if self.registry is None:
            return
        for module, state in states.items():
            if (self.registry.module_dir(module) / f"v{version:04d}").is_dir():
                continue  # seen before (train and evaluate both hold it; a redone round)
            info = {**manifest, "source": sources[module]}
            self.registry.publish(module, state, loras[module], info, number=version)
