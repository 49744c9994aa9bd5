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
tools) the kept tensors live in memory (``client.kept_states``). ``residual/`` holds the
up-link's quantisation residual after each round, the same way (``common.error_feedback``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peft import LoraConfig

from client.kept_states import KEPT_FOLDER, RESIDUAL_FOLDER, KeptStates
from client.received import RECEIVED_FOLDER, ReceivedVersions
from client.round_claims import check_run_id, claim
from common.adapters import AdapterState
from common.registry import Registry

logger = logging.getLogger(__name__)

REGISTRY_FOLDER = "registry"


class SiteStore:
    """One site's folder (``root``), or memory only when ``root`` is None."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.kept = KeptStates(None if root is None else root / KEPT_FOLDER)
        # The up-link's quantisation residual after each round (common.error_feedback).
        self.residuals = KeptStates(None if root is None else root / RESIDUAL_FOLDER)
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

    def load_kept(self, before: int) -> AdapterState:
        """What the site kept after training on the newest version ``< before`` ({} if none)."""
        return self.kept.load(before)

    def save_kept(self, version: int, kept: AdapterState) -> None:
        """Store what the site keeps after training on ``version`` (replacing a redone one)."""
        self.kept.save(version, kept)

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
