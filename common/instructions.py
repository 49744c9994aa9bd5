"""Signed instructions: a site acts only on what the coordinator it enrolled with has signed.

The coordinator holds an Ed25519 *instruction key* (``coordinator-sign.key``, next to its
envelope key); every site's bundle pins its public half (``coordinator-sign.pub``). Every
train and evaluate instruction, the secure-sum stages included, carries in its header
(``P.KEY_SIGNATURE``) a signature over the instruction's whole content: the message type, every
header entry but the signature, the global adapter's tensors and any secure-sum payload.

What this stops: an outsider who reaches the SuperLink (and can run its own ServerApp or inject
messages) cannot make a site train on, evaluate or send anything for an instruction it made up
or altered, for example a plan whose privacy mode was switched to ``none``. It does not stop the
coordinator itself from asking for less protection: the site's policy
(``common.site_policy``) refuses that.

The digest is SHA-256 over a length-prefixed, typed encoding of every record in name order,
so that no two different contents encode alike.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import protocol as P
from common.errors import FedloraError

if TYPE_CHECKING:  # flwr costs ~0.5 s to import; `fedlora keys` needs only the file names
    from flwr.app import RecordDict

# File names: the coordinator keeps the private half, every site bundle gets the public half.
INSTRUCTION_KEY_ID = "coordinator-sign"
INSTRUCTION_KEY_NAME = f"{INSTRUCTION_KEY_ID}.key"
INSTRUCTION_PUBLIC_NAME = f"{INSTRUCTION_KEY_ID}.pub"

_DOMAIN = b"fedlora-instruction/1\x00"


class InstructionRefused(FedloraError):
    """An instruction without a valid signature of the pinned coordinator instruction key."""


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _value(value: object) -> bytes:
    """A typed, length-prefixed encoding of one record value (scalars and lists of them)."""
    if isinstance(value, list):
        return b"L" + _field(b"".join(_value(item) for item in value))
    if isinstance(value, bool):
        return b"b" + _field(b"1" if value else b"0")
    if isinstance(value, int):
        return b"i" + _field(str(value).encode())
    if isinstance(value, float):
        return b"f" + _field(struct.pack(">d", value))
    if isinstance(value, str):
        return b"s" + _field(value.encode())
    if isinstance(value, bytes):
        return b"y" + _field(value)
    raise InstructionRefused(
        f"an instruction value of type {type(value).__name__} cannot be signed"
    )


def _entries(record: object) -> Iterable[bytes]:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    if isinstance(record, ArrayRecord):
        for key, array in sorted(record.items()):
            meta = f"{array.dtype}|{list(array.shape)}|{array.stype}".encode()
            yield _field(key.encode()) + _field(meta) + _field(array.data)
    elif isinstance(record, ConfigRecord | MetricRecord):
        for key, value in sorted(record.items()):
            yield _field(key.encode()) + _value(value)
    else:
        raise InstructionRefused(f"an instruction record of type {type(record).__name__}")


def instruction_digest(content: RecordDict, message_type: str) -> bytes:
    """SHA-256 of ``message_type`` and every record of ``content``, the signature excluded."""
    from flwr.app import ConfigRecord

    digest = hashlib.sha256(_DOMAIN + _field(message_type.encode()))
    for name, record in sorted(content.items()):
        if name == P.HEADER_RECORD and isinstance(record, ConfigRecord):
            record = ConfigRecord({k: v for k, v in record.items() if k != P.KEY_SIGNATURE})
        kind = type(record).__name__.encode()
        digest.update(_field(name.encode()) + _field(kind))
        for entry in _entries(record):
            digest.update(entry)
    return digest.digest()


def sign_instruction(content: RecordDict, message_type: str, key: Ed25519PrivateKey) -> None:
    """Sign ``content`` in place: its header gets ``P.KEY_SIGNATURE``."""
    header = content.config_records[P.HEADER_RECORD]
    header[P.KEY_SIGNATURE] = key.sign(instruction_digest(content, message_type))


def verify_instruction(content: RecordDict, message_type: str, key: Ed25519PublicKey) -> None:
    """Raise ``InstructionRefused`` unless ``content`` carries ``key``'s valid signature."""
    header = content.config_records.get(P.HEADER_RECORD)
    signature = None if header is None else header.get(P.KEY_SIGNATURE)
    if not isinstance(signature, bytes):
        raise InstructionRefused(
            "instruction refused: it carries no coordinator signature, and this site accepts "
            f"only instructions signed with the pinned {INSTRUCTION_PUBLIC_NAME}"
        )
    try:
        key.verify(signature, instruction_digest(content, message_type))
    except InvalidSignature:
        raise InstructionRefused(
            "instruction refused: its signature does not verify with the pinned "
            f"{INSTRUCTION_PUBLIC_NAME} (altered in transit, or not from this site's coordinator)"
        ) from None


def instruction_key_path(coordinator_key: Path) -> Path:
    """Where the instruction key lives: beside the coordinator's envelope key."""
    return Path(coordinator_key).parent / INSTRUCTION_KEY_NAME
