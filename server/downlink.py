"""The coordinator's side of the down-link: which form of a global version each site gets.

A site gets a *reference* to version ``t`` when it confirmed ``t``, the encoded *step* from
``t - 1`` when it confirmed ``t - 1``, and the full state otherwise (``common.downlink``).
"Confirmed" means a reply the coordinator accepted for an instruction that carried the version:
the site answers only after it rebuilt the version and checked its SHA-256, and it stores it
first. Confirmations are kept per Flower node (authenticated by the SuperLink), in memory: a
resumed coordinator, or a node it has not heard from, gets the full state once.

A site that fails an instruction (an error reply: whatever the reason, a missing or corrupt
copy included) is forgotten, so its next instruction carries the full state. Nothing is retried
within a round: the error reply costs that site one stage, and the round goes on without it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common import protocol as P
from common.adapters import AdapterState
from common.config import DownlinkEncoding
from common.downlink import published_step, state_sha256
from common.errors import UpdateRejected

logger = logging.getLogger(__name__)

FULL = "full"  # federation.downlink: the whole state in every instruction


class Downlink:
    """Confirmed versions per node and the newest step, for ``federation.downlink``."""

    def __init__(self, encoding: DownlinkEncoding, max_bytes: int) -> None:
        self.encoding = encoding
        self.max_bytes = max_bytes  # bound on a step payload (privacy.max-payload-bytes)
        self.confirmed: dict[int, int] = {}  # Flower node id -> the version it verified
        self._step: tuple[int, bytes] | None = None  # (version t, encoded step from t - 1)

    def publish(
        self, version: int, base: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
    ) -> AdapterState:
        """The state to publish as ``version`` when the aggregate is ``new`` and ``version -
        1`` is ``base``: what sites rebuild from the encoded step (``common.downlink``)."""
        encoding = self.encoding
        if encoding == "full":
            return dict(new)
        try:
            payload, published = published_step(base, new, encoding, self.max_bytes)
        except UpdateRejected as exc:  # e.g. a step beyond fp16's range: send full state
            logger.warning(
                "v%04d is sent as full state: its step cannot be encoded (%s)", version, exc
            )
            self._step = None
            return dict(new)
        self._step = (version, payload)
        return published

    def confirm(self, node: int, version: int) -> None:
        self.confirmed[node] = version

    def forget(self, node: int) -> None:
        self.confirmed.pop(node, None)

    def form(self, node: int, version: int) -> str:
        """How ``version`` reaches ``node``: ``P.FORM_REFERENCE``, ``_STEP`` or ``_FULL``."""
        held = self.confirmed.get(node)
        if self.encoding == FULL or held is None:
            return P.FORM_FULL
        if held == version:
            return P.FORM_REFERENCE
        if held == version - 1 and self._step is not None and self._step[0] == version:
            return P.FORM_STEP
        return P.FORM_FULL

    def content(
        self, form: str, header: ConfigRecord, arrays: ArrayRecord, digest: str
    ) -> tuple[RecordDict, int]:
        """An unsigned instruction carrying the header's version in ``form``; its bytes down."""
        header = ConfigRecord(dict(header))
        header[P.KEY_GLOBAL_FORM] = form
        header[P.KEY_GLOBAL_SHA256] = digest
        content = RecordDict({P.HEADER_RECORD: header})
        if form == P.FORM_FULL:
            content.array_records[P.GLOBAL_RECORD] = arrays
            return content, sum(len(array.data) for array in arrays.values())
        if form == P.FORM_STEP:
            assert self._step is not None
            version, payload = self._step
            header[P.KEY_GLOBAL_BASE] = version - 1
            content.config_records[P.GLOBAL_STEP_RECORD] = ConfigRecord({P.KEY_DELTA: payload})
            return content, len(payload)
        return content, 0


def arrays_sha256(arrays: ArrayRecord) -> str:
    """``state_sha256`` of the state an ArrayRecord carries (what a site reads from it)."""
    return state_sha256(arrays.to_torch_state_dict())
