"""Signed instructions (``common.instructions``): every part of an instruction is covered."""

from __future__ import annotations

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from common import protocol as P
from common.instructions import (
    InstructionRefused,
    instruction_digest,
    sign_instruction,
    verify_instruction,
)

KEY = Ed25519PrivateKey.generate()


def _content() -> RecordDict:
    header = ConfigRecord(
        {P.KEY_RUN_ID: "run-1", P.KEY_ROUND: 3, P.KEY_PLAN: '{"privacy-mode": "sealed"}'}
    )
    arrays = ArrayRecord({"shared/a": torch.arange(6.0).reshape(2, 3)})
    secagg = ConfigRecord({"shares": b"\x01\x02", "ids": [1, 2], "w": 0.5, "ok": True})
    return RecordDict({P.GLOBAL_RECORD: arrays, P.HEADER_RECORD: header, "secagg": secagg})


def _signed() -> RecordDict:
    content = _content()
    sign_instruction(content, MessageType.TRAIN, KEY)
    return content


def test_signed_instruction_verifies() -> None:
    verify_instruction(_signed(), MessageType.TRAIN, KEY.public_key())


def test_unsigned_instruction_is_refused() -> None:
    with pytest.raises(InstructionRefused, match="carries no coordinator signature"):
        verify_instruction(_content(), MessageType.TRAIN, KEY.public_key())


def test_other_key_is_refused() -> None:
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(InstructionRefused, match="does not verify"):
        verify_instruction(_signed(), MessageType.TRAIN, other)


def test_other_message_type_is_refused() -> None:
    """A train instruction's signature does not make an evaluate instruction."""
    with pytest.raises(InstructionRefused, match="does not verify"):
        verify_instruction(_signed(), MessageType.EVALUATE, KEY.public_key())


def _alter_plan(content: RecordDict) -> None:
    content.config_records[P.HEADER_RECORD][P.KEY_PLAN] = '{"privacy-mode": "none"}'


def _alter_round(content: RecordDict) -> None:
    content.config_records[P.HEADER_RECORD][P.KEY_ROUND] = 4


def _add_header_entry(content: RecordDict) -> None:
    content.config_records[P.HEADER_RECORD]["stage"] = "secagg-unmask"


def _alter_tensor(content: RecordDict) -> None:
    content.array_records[P.GLOBAL_RECORD] = ArrayRecord(
        {"shared/a": torch.arange(6.0).reshape(2, 3) + 1e-6}
    )


def _reshape_tensor(content: RecordDict) -> None:
    content.array_records[P.GLOBAL_RECORD] = ArrayRecord(
        {"shared/a": torch.arange(6.0).reshape(3, 2)}
    )


def _alter_payload(content: RecordDict) -> None:
    content.config_records["secagg"]["shares"] = b"\x01\x03"


def _add_record(content: RecordDict) -> None:
    content["extra"] = ConfigRecord({"x": 1})


def _int_for_str(content: RecordDict) -> None:
    """Same text, other type: the encoding is typed."""
    content.config_records[P.HEADER_RECORD][P.KEY_ROUND] = "3"


@pytest.mark.parametrize(
    "alter",
    [
        _alter_plan,
        _alter_round,
        _add_header_entry,
        _alter_tensor,
        _reshape_tensor,
        _alter_payload,
        _add_record,
        _int_for_str,
    ],
)
def test_any_change_after_signing_is_refused(alter) -> None:  # type: ignore[no-untyped-def]
    content = _signed()
    alter(content)
    with pytest.raises(InstructionRefused, match="does not verify"):
        verify_instruction(content, MessageType.TRAIN, KEY.public_key())


def test_digest_ignores_only_the_signature() -> None:
    assert instruction_digest(_signed(), MessageType.TRAIN) == instruction_digest(
        _content(), MessageType.TRAIN
    )
