"""The sealed envelope: one encoded delta, encrypted to the coordinator and signed by its site.

Sealing is HPKE (RFC 9180) base mode, single shot, through ``cryptography``'s ``hpke`` module:
KEM X25519 (DHKEM, the default) or the hybrid post-quantum ML-KEM-768 + X25519, then
HKDF-SHA256 and AES-256-GCM. HPKE's ``info`` binds the ciphertext to its context
(``fedlora/1 | run | round | site | module | version | base fingerprint``), so an envelope
opened under any other context fails. The site then signs the whole envelope with its Ed25519
identity key, so the coordinator knows who sealed it: HPKE alone leaves the sender anonymous.

Layout (big-endian integers, all lengths in bytes)::

    offset  size        field
    0       4           magic b"FLE1"
    4       1           envelope version (1)
    5       1           suite: 1 = X25519, 2 = ML-KEM-768+X25519 (both HKDF-SHA256, AES-256-GCM)
    6       2           I = length of the context
    8       4           S = length of the HPKE output
    12      I           context = the HPKE info, in clear (see ``EnvelopeContext.info``)
    12+I    S           HPKE output: enc (32 or 1120 bytes) || AES-GCM ciphertext || 16-byte tag
    12+I+S  64          Ed25519 signature over SIGNATURE_DOMAIN || bytes [0, 12+I+S)

The context travels in clear (it is metadata the relay sees anyway) so that the coordinator
knows which site key to verify with and can say exactly why a replayed or re-addressed
envelope is refused; HPKE then opens with the info built from the *expected* context, never
from the envelope's claim.

``open_delta`` checks, in order: size bound (before anything is parsed), header, context
syntax, site in the allow-list, signature, context equal to the expected one, suite matching
the coordinator key, HPKE decryption. Every failure raises ``UpdateRejected`` with a short
reason; plaintext is returned whole or not at all, and is never written or logged here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from common.allow_list import AllowList
from common.config import SITE_ID_PATTERN
from common.errors import UpdateRejected
from common.keys import (
    CoordinatorPrivateKey,
    CoordinatorPublicKey,
    Kem,
    UnknownSite,
)
from common.protocol import PROTOCOL_VERSION

MAGIC = b"FLE1"
ENVELOPE_VERSION = 1
SUITE_X25519 = 1
SUITE_MLKEM768_X25519 = 2
SUITE_IDS: dict[Kem, int] = {"x25519": SUITE_X25519, "mlkem768-x25519": SUITE_MLKEM768_X25519}
# KDF and AEAD are fixed per suite id, so one byte names the whole HPKE suite. AES-256 rather
# than AES-128 so the symmetric half keeps a post-quantum margin to match the hybrid KEM.
_SUITES: dict[int, tuple[Kem, Suite, int]] = {
    SUITE_X25519: (
        "x25519",
        Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
        KEM.X25519.enc_length(),
    ),
    SUITE_MLKEM768_X25519: (
        "mlkem768-x25519",
        Suite(KEM.MLKEM768_X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
        KEM.MLKEM768_X25519.enc_length(),
    ),
}
# magic, version, suite, context length (bytes), HPKE output length (bytes).
HEADER = struct.Struct(">4sBBHI")
SIGNATURE_BYTES = 64
TAG_BYTES = 16
# Prefix of every signed message: a site key may later sign other things (secure-sum key
# advertisements), and a signature made for one purpose must never verify for another.
SIGNATURE_DOMAIN = b"fedlora/1 sealed-delta signature\x00"
# Longest string field of the context (UTF-8 bytes); a run id or fingerprint is far shorter.
MAX_FIELD_BYTES = 256
_STRING_FIELDS = ("protocol", "run_id", "site_id", "module", "base_fingerprint")
_INT_FIELDS = ("round", "version")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
MAX_CONTEXT_BYTES = len(_STRING_FIELDS) * (_U16.size + MAX_FIELD_BYTES) + 2 * _U64.size
# Largest HPKE output the 4-byte length field can describe.
_MAX_SEALED_BYTES = 2**32 - 1
# Field names as a user reads them in a rejection reason.
_FIELD_LABELS = {
    "protocol": "protocol",
    "run_id": "run",
    "round": "round",
    "site_id": "site",
    "module": "module",
    "version": "module version",
    "base_fingerprint": "base fingerprint",
}


@dataclass(frozen=True, kw_only=True)
class EnvelopeContext:
    """Everything an envelope is bound to; sealing and opening must agree on every field."""

    protocol: str = PROTOCOL_VERSION
    run_id: str
    round: int
    site_id: str
    module: str
    version: int
    base_fingerprint: str

    def __post_init__(self) -> None:
        for name in _STRING_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"envelope context {name}: expected a non-empty string")
            if len(value.encode("utf-8")) > MAX_FIELD_BYTES:
                raise ValueError(f"envelope context {name}: over {MAX_FIELD_BYTES} bytes")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
                raise ValueError(f"envelope context {name}: expected an integer in [0, 2**64)")
        if not SITE_ID_PATTERN.fullmatch(self.site_id):
            raise ValueError("envelope context site_id: not a valid site id")

    def info(self) -> bytes:
        """The canonical bytes bound into HPKE and signed: the HPKE ``info``.

        Each field in declaration order; strings as a u16 length + UTF-8, integers as u64
        (big-endian). Length prefixes rather than separators, so no field's content can
        shift a boundary: ``run="a|b", module="c"`` and ``run="a", module="b|c"`` differ.
        """
        parts = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in _INT_FIELDS:
                parts.append(_U64.pack(value))
            else:
                raw = value.encode("utf-8")
                parts.append(_U16.pack(len(raw)) + raw)
        return b"".join(parts)

    @classmethod
    def from_info(cls, data: bytes) -> EnvelopeContext:
        """Inverse of ``info``; ``ValueError`` unless ``data`` is exactly one encoding."""
        values: dict[str, str | int] = {}
        offset = 0
        for field in fields(cls):
            if field.name in _INT_FIELDS:
                (values[field.name],) = _U64.unpack_from(data, offset)
                offset += _U64.size
            else:
                (length,) = _U16.unpack_from(data, offset)
                start, offset = offset + _U16.size, offset + _U16.size + length
                if offset > len(data):
                    raise ValueError("context field runs past the end")
                values[field.name] = data[start:offset].decode("utf-8")
        if offset != len(data):
            raise ValueError("trailing bytes after the context")
        return cls(**values)  # type: ignore[arg-type]


def max_envelope_bytes(max_payload_bytes: int) -> int:
    """The largest envelope that can hold a payload of ``max_payload_bytes``.

    Pass it as ``open_delta``'s ``max_bytes`` when the configured limit is on the payload.
    """
    largest_enc = max(enc for _, _, enc in _SUITES.values())
    overhead = HEADER.size + MAX_CONTEXT_BYTES + largest_enc + TAG_BYTES + SIGNATURE_BYTES
    return max_payload_bytes + overhead


def seal_delta(
    payload: bytes,
    coordinator_public: CoordinatorPublicKey,
    site_private: Ed25519PrivateKey,
    context: EnvelopeContext,
) -> bytes:
    """Encrypt ``payload`` to the coordinator under ``context`` and sign it with the site key.

    Parameters
    ----------
    payload
        The encoded delta (``common.encoding.encode_delta``).
    coordinator_public
        From ``coordinator.pub``; its KEM picks the suite.
    site_private
        The sealing site's Ed25519 identity key (``context.site_id``'s key).
    context
        Run, round, site, module, version and base fingerprint this delta belongs to.

    Returns
    -------
    bytes
        The envelope (layout in the module docstring); a fresh ephemeral KEM key per call.
    """
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if not isinstance(site_private, Ed25519PrivateKey):
        raise TypeError("site_private must be an Ed25519 private key")
    suite_id = SUITE_IDS[coordinator_public.kem]
    _, suite, enc_length = _SUITES[suite_id]
    if len(payload) > _MAX_SEALED_BYTES - enc_length - TAG_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes is too large for one envelope")
    info = context.info()
    sealed = suite.encrypt(payload, coordinator_public.hpke_key(), info=info)
    body = HEADER.pack(MAGIC, ENVELOPE_VERSION, suite_id, len(info), len(sealed)) + info + sealed
    return body + site_private.sign(SIGNATURE_DOMAIN + body)


@dataclass(frozen=True)
class _Parsed:
    suite_id: int
    context: EnvelopeContext
    body: memoryview  # everything the signature covers
    sealed: memoryview
    signature: bytes


def _parse(envelope: bytes, max_bytes: int) -> _Parsed:
    """Bound, then split an envelope; only lengths and the context are read here."""
    if not isinstance(envelope, bytes):
        raise UpdateRejected(f"envelope is {type(envelope).__name__}, expected bytes")
    if len(envelope) > max_bytes:
        raise UpdateRejected(f"envelope of {len(envelope)} bytes exceeds the bound of {max_bytes}")
    if len(envelope) < HEADER.size + SIGNATURE_BYTES:
        raise UpdateRejected("envelope truncated")
    magic, version, suite_id, info_len, sealed_len = HEADER.unpack_from(envelope)
    if magic != MAGIC:
        raise UpdateRejected("not a fedlora envelope")
    if version != ENVELOPE_VERSION:
        raise UpdateRejected(f"unsupported envelope version {version}")
    if suite_id not in _SUITES:
        raise UpdateRejected(f"unknown envelope suite {suite_id}")
    if info_len > MAX_CONTEXT_BYTES or sealed_len < _SUITES[suite_id][2] + TAG_BYTES:
        raise UpdateRejected("envelope length fields are out of range")
    if HEADER.size + info_len + sealed_len + SIGNATURE_BYTES != len(envelope):
        raise UpdateRejected("envelope length fields do not match its size (truncated?)")
    view = memoryview(envelope)
    sealed_start = HEADER.size + info_len
    try:
        context = EnvelopeContext.from_info(envelope[HEADER.size : sealed_start])
    except (ValueError, struct.error):  # UnicodeDecodeError is a ValueError
        raise UpdateRejected("envelope context malformed") from None
    return _Parsed(
        suite_id=suite_id,
        context=context,
        body=view[: len(envelope) - SIGNATURE_BYTES],
        sealed=view[sealed_start : len(envelope) - SIGNATURE_BYTES],
        signature=envelope[len(envelope) - SIGNATURE_BYTES :],
    )


def _verify_signature(parsed: _Parsed, allow_list: AllowList) -> None:
    site_id = parsed.context.site_id
    try:
        site_key = allow_list.public_key(site_id)
    except UnknownSite:
        # site_id matched SITE_ID_PATTERN while parsing, so quoting it is short and safe.
        raise UpdateRejected(f"envelope from site {site_id!r}, which is not enrolled") from None
    try:
        site_key.verify(parsed.signature, SIGNATURE_DOMAIN + parsed.body)
    except InvalidSignature:
        raise UpdateRejected("envelope signature invalid") from None


def _check_context(actual: EnvelopeContext, expected: EnvelopeContext) -> None:
    """Name the first field in which a (correctly signed) envelope differs from ``expected``."""
    for field in fields(EnvelopeContext):
        got, want = getattr(actual, field.name), getattr(expected, field.name)
        if got != want:
            label = _FIELD_LABELS[field.name]
            raise UpdateRejected(
                f"envelope is for {label} {_short(got)}, expected {label} {_short(want)}"
            )


def _short(value: str | int) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def open_delta(
    envelope: bytes,
    coordinator_private: CoordinatorPrivateKey,
    allow_list: AllowList,
    expected: EnvelopeContext,
    max_bytes: int,
) -> bytes:
    """Verify and decrypt an envelope sealed for ``expected``; return the payload bytes.

    Parameters
    ----------
    envelope
        Bytes as received; nothing is parsed before ``len(envelope) <= max_bytes`` holds.
    coordinator_private
        From ``coordinator.key``.
    allow_list
        Enrolled site keys; the envelope's site must be in it.
    expected
        The context the coordinator asked for (this run, round, site, module, version and
        base fingerprint).
    max_bytes
        Largest envelope accepted (see ``max_envelope_bytes``).

    Raises
    ------
    UpdateRejected
        For every failure, with a short reason.
    """
    parsed = _parse(envelope, max_bytes)
    _verify_signature(parsed, allow_list)
    _check_context(parsed.context, expected)
    kem, suite, _ = _SUITES[parsed.suite_id]
    if kem != coordinator_private.kem:
        raise UpdateRejected(
            f"envelope sealed with KEM {kem}, but the coordinator key is {coordinator_private.kem}"
        )
    try:
        return suite.decrypt(parsed.sealed, coordinator_private.hpke_key(), info=expected.info())
    except InvalidTag:
        raise UpdateRejected(
            "envelope cannot be opened: sealed to another coordinator key or context"
        ) from None
