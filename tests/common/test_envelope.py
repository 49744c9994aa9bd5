"""Sealed envelopes, in the style of pyca's test_hpke.py: roundtrip, wrong key, wrong context,
tamper, truncation, and a property test that no mutation of an envelope ever opens."""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from collections.abc import Callable

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import common.envelope as envelope_module
from common.allow_list import AllowList
from common.encoding import decode_delta, encode_delta
from common.envelope import (
    ENVELOPE_VERSION,
    HEADER,
    MAGIC,
    MAX_CONTEXT_BYTES,
    MAX_FIELD_BYTES,
    SIGNATURE_BYTES,
    SIGNATURE_DOMAIN,
    SUITE_MLKEM768_X25519,
    SUITE_X25519,
    TAG_BYTES,
    EnvelopeContext,
    max_envelope_bytes,
    open_delta,
    seal_delta,
)
from common.errors import UpdateRejected
from common.keys import KEMS, CoordinatorPrivateKey

# Bytes of the KEM's encapsulated key inside the HPKE output (RFC 9180 Nenc).
ENC_BYTES = {"x25519": 32, "mlkem768-x25519": 1120}
SUITE_BYTE = {"x25519": SUITE_X25519, "mlkem768-x25519": SUITE_MLKEM768_X25519}
MAX_BYTES = 2**24
PAYLOAD = b"CANARY-delta-bytes " * 8
CONTEXT = EnvelopeContext(
    run_id="run-7",
    round=3,
    site_id="site-a",
    module="shared",
    version=2,
    base_fingerprint="ab" * 32,
)


def coordinator_key(kem: str) -> CoordinatorPrivateKey:
    pq = MLKEM768PrivateKey.generate() if kem == "mlkem768-x25519" else None
    return CoordinatorPrivateKey(X25519PrivateKey.generate(), pq)


COORDINATOR = {kem: coordinator_key(kem) for kem in KEMS}
SITE_A = Ed25519PrivateKey.generate()
SITE_B = Ed25519PrivateKey.generate()
ALLOW = AllowList({"site-a": SITE_A.public_key(), "site-b": SITE_B.public_key()})


def seal(kem: str = "x25519", payload: bytes = PAYLOAD, **changes: object) -> bytes:
    context = dataclasses.replace(CONTEXT, **changes)  # type: ignore[arg-type]
    return seal_delta(payload, COORDINATOR[kem].public_key(), SITE_A, context)


def open_(envelope: bytes, kem: str = "x25519", **changes: object) -> bytes:
    expected = dataclasses.replace(CONTEXT, **changes)  # type: ignore[arg-type]
    return open_delta(envelope, COORDINATOR[kem], ALLOW, expected, MAX_BYTES)


def resign(body: bytes, key: Ed25519PrivateKey = SITE_A) -> bytes:
    """An envelope whose body an attacker (or a site) chose, signed by ``key``."""
    return body + key.sign(SIGNATURE_DOMAIN + body)


def body_of(envelope: bytes) -> bytes:
    return envelope[:-SIGNATURE_BYTES]


def readdress(envelope: bytes, **changes: object) -> bytes:
    """The same HPKE output under a different clear-text context (signature not renewed)."""
    _, _, suite, info_len, sealed_len = HEADER.unpack_from(envelope)
    info = dataclasses.replace(CONTEXT, **changes).info()  # type: ignore[arg-type]
    sealed = envelope[HEADER.size + info_len : HEADER.size + info_len + sealed_len]
    header = HEADER.pack(MAGIC, ENVELOPE_VERSION, suite, len(info), len(sealed))
    return header + info + sealed + envelope[-SIGNATURE_BYTES:]


# ---------------------------------------------------------------------------- roundtrip


@pytest.mark.parametrize("kem", KEMS)
@pytest.mark.parametrize("size", [0, 1, 1000, 100_000])
def test_roundtrip(kem: str, size: int) -> None:
    payload = os.urandom(size)
    assert open_(seal(kem, payload), kem) == payload


@pytest.mark.parametrize("kem", KEMS)
def test_roundtrip_of_an_encoded_delta(kem: str) -> None:
    delta = {"layer.lora_A.weight": torch.randn(4, 8), "layer.lora_B.weight": torch.randn(8, 4)}
    payload = encode_delta(delta, "fp16")
    decoded = decode_delta(open_(seal(kem, payload), kem), MAX_BYTES)
    assert torch.allclose(decoded["layer.lora_A.weight"], delta["layer.lora_A.weight"], atol=1e-2)


@pytest.mark.parametrize("kem", KEMS)
def test_layout_and_overhead(kem: str) -> None:
    envelope = seal(kem)
    magic, version, suite, info_len, sealed_len = HEADER.unpack_from(envelope)
    assert (magic, version, suite) == (MAGIC, ENVELOPE_VERSION, SUITE_BYTE[kem])
    assert envelope[HEADER.size : HEADER.size + info_len] == CONTEXT.info()
    assert sealed_len == ENC_BYTES[kem] + len(PAYLOAD) + TAG_BYTES
    overhead = HEADER.size + info_len + ENC_BYTES[kem] + TAG_BYTES + SIGNATURE_BYTES
    assert len(envelope) == len(PAYLOAD) + overhead


def test_each_seal_is_fresh_and_hides_the_payload() -> None:
    first, second = seal(), seal()
    assert first != second  # a fresh ephemeral KEM key (hence key and nonce) per envelope
    assert b"CANARY" not in first and b"CANARY" not in second


def test_max_envelope_bytes_is_the_largest_overhead_exactly() -> None:
    # header 12 + context 5 * (2 + 256) + 2 * 8 + ML-KEM-768+X25519 enc 1120 + tag + signature
    assert MAX_CONTEXT_BYTES == 1306
    assert max_envelope_bytes(0) == 12 + 1306 + 1120 + 16 + 64
    assert max_envelope_bytes(1000) == max_envelope_bytes(0) + 1000


def test_seal_refuses_a_payload_that_is_not_bytes_and_a_key_that_is_not_ed25519() -> None:
    public = COORDINATOR["x25519"].public_key()
    with pytest.raises(TypeError, match=r"^payload must be bytes, got bytearray$"):
        seal_delta(bytearray(PAYLOAD), public, SITE_A, CONTEXT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^site_private must be an Ed25519 private key$"):
        seal_delta(PAYLOAD, public, X25519PrivateKey.generate(), CONTEXT)  # type: ignore[arg-type]


@pytest.mark.parametrize("kem", KEMS)
def test_largest_payload_is_what_the_length_field_can_describe(
    kem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real bound is 4 GiB of HPKE output; a small one shows where it falls without that.
    monkeypatch.setattr(envelope_module, "_MAX_SEALED_BYTES", ENC_BYTES[kem] + TAG_BYTES + 100)
    assert open_(seal(kem, bytes(100)), kem) == bytes(100)
    too_large = r"^payload of 101 bytes is too large for one envelope$"
    with pytest.raises(ValueError, match=too_large):
        seal(kem, bytes(101))


def test_max_envelope_bytes_covers_the_largest_context() -> None:
    big = "x" * MAX_FIELD_BYTES
    context = EnvelopeContext(
        protocol=big, run_id=big, round=2**64 - 1, site_id="s" * 64, module=big,
        version=2**64 - 1, base_fingerprint=big,
    )  # fmt: skip
    assert len(context.info()) <= MAX_CONTEXT_BYTES
    for kem in KEMS:
        payload = os.urandom(5000)
        envelope = seal_delta(payload, COORDINATOR[kem].public_key(), SITE_A, context)
        assert len(envelope) <= max_envelope_bytes(len(payload))


# ---------------------------------------------------------------------------- wrong key


@pytest.mark.parametrize("kem", KEMS)
def test_wrong_coordinator_key(kem: str) -> None:
    envelope = seal(kem)
    with pytest.raises(UpdateRejected, match=r"^envelope cannot be opened"):
        open_delta(envelope, coordinator_key(kem), ALLOW, CONTEXT, MAX_BYTES)


def test_coordinator_key_of_the_other_kem() -> None:
    with pytest.raises(UpdateRejected, match="sealed with KEM x25519, but the coordinator key"):
        open_(seal("x25519"), "mlkem768-x25519")
    with pytest.raises(UpdateRejected, match="sealed with KEM mlkem768-x25519"):
        open_(seal("mlkem768-x25519"), "x25519")


def test_signature_by_another_site_key() -> None:
    with pytest.raises(UpdateRejected, match=r"^envelope signature invalid$"):
        open_(resign(body_of(seal()), SITE_B))


def test_unsigned_envelope() -> None:
    envelope = seal()
    with pytest.raises(UpdateRejected):
        open_(body_of(envelope))
    with pytest.raises(UpdateRejected, match=r"^envelope signature invalid$"):
        open_(body_of(envelope) + bytes(SIGNATURE_BYTES))


def test_site_not_in_allow_list() -> None:
    stranger = Ed25519PrivateKey.generate()
    context = dataclasses.replace(CONTEXT, site_id="site-z")
    envelope = seal_delta(PAYLOAD, COORDINATOR["x25519"].public_key(), stranger, context)
    with pytest.raises(UpdateRejected, match="site 'site-z', which is not enrolled"):
        open_(envelope, site_id="site-z")


# ---------------------------------------------------------------------------- wrong context


OTHER_CONTEXTS = [
    ("round", 4, "round 3, expected round 4"),  # replay into a later round
    ("round", 2, "round 3, expected round 2"),
    ("version", 3, "module version 2, expected module version 3"),
    ("run_id", "run-8", "run 'run-7', expected run 'run-8'"),
    ("module", "group-eu", "module 'shared', expected module 'group-eu'"),
    ("base_fingerprint", "cd" * 32, "base fingerprint 'abab"),
    ("protocol", "fedlora/2", "protocol 'fedlora/1', expected protocol 'fedlora/2'"),
    ("site_id", "site-b", "site 'site-a', expected site 'site-b'"),
]


@pytest.mark.parametrize("kem", KEMS)
@pytest.mark.parametrize(("field", "value", "reason"), OTHER_CONTEXTS)
def test_wrong_context_is_rejected_naming_the_field(
    kem: str, field: str, value: object, reason: str
) -> None:
    with pytest.raises(UpdateRejected, match=f"^envelope is for {reason}"):
        open_(seal(kem), kem, **{field: value})


@pytest.mark.parametrize(("field", "value", "reason"), OTHER_CONTEXTS)
def test_readdressed_context_breaks_the_signature(field: str, value: object, reason: str) -> None:
    """An attacker rewrites the clear context to the one the coordinator expects."""
    with pytest.raises(UpdateRejected, match=r"^envelope signature invalid$"):
        open_(readdress(seal(), **{field: value}), **{field: value})


def test_enrolled_site_cannot_pass_off_another_sites_ciphertext() -> None:
    """Site B takes site A's envelope, claims it as its own and signs it with its own key:
    the signature and clear context check out, but HPKE's info still says site A."""
    forged = resign(body_of(readdress(seal(), site_id="site-b")), SITE_B)
    with pytest.raises(UpdateRejected, match=r"^envelope cannot be opened"):
        open_(forged, site_id="site-b")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"round": -1}, "round: expected an integer in [0, 2**64)"),
     ({"round": True}, "round: expected an integer in [0, 2**64)"),
     ({"version": 2**64}, "version: expected an integer in [0, 2**64)"),
     ({"module": ""}, "module: expected a non-empty string"),
     ({"run_id": 7}, "run_id: expected a non-empty string"),
     ({"site_id": "../a"}, "site_id: not a valid site id"),
     ({"base_fingerprint": "x" * (MAX_FIELD_BYTES + 1)}, "base_fingerprint: over 256 bytes"),
     ({"module": "é" * 129}, "module: over 256 bytes")],  # counted in UTF-8 bytes
)  # fmt: skip
def test_invalid_context_is_refused(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=f"^envelope context {re.escape(reason)}$"):
        dataclasses.replace(CONTEXT, **changes)  # type: ignore[arg-type]


def test_context_bounds_are_inclusive() -> None:
    for changes in ({"round": 0, "version": 0}, {"round": 2**64 - 1, "module": "é" * 128}):
        context = dataclasses.replace(CONTEXT, **changes)  # type: ignore[arg-type]
        assert EnvelopeContext.from_info(context.info()) == context


def test_context_encoding_is_unambiguous() -> None:
    joined = dataclasses.replace(CONTEXT, run_id="a|b", module="c")
    split = dataclasses.replace(CONTEXT, run_id="a", module="b|c")
    assert joined.info() != split.info()
    assert EnvelopeContext.from_info(joined.info()) == joined
    with pytest.raises(ValueError, match=r"^trailing bytes after the context$"):
        EnvelopeContext.from_info(joined.info() + b"\x00")
    with pytest.raises(ValueError, match=r"^context field runs past the end$"):
        EnvelopeContext.from_info(joined.info()[:-1])
    with pytest.raises(struct.error):
        EnvelopeContext.from_info(b"")


def test_malformed_context_is_rejected_even_if_signed() -> None:
    envelope = seal()
    _, _, suite, info_len, sealed_len = HEADER.unpack_from(envelope)
    info = CONTEXT.info() + b"\x00"  # one trailing byte
    sealed = envelope[HEADER.size + info_len : -SIGNATURE_BYTES]
    body = HEADER.pack(MAGIC, ENVELOPE_VERSION, suite, len(info), sealed_len) + info + sealed
    with pytest.raises(UpdateRejected, match=r"^envelope context malformed$"):
        open_(resign(body))


@pytest.mark.parametrize(
    ("length", "shown"), [(78, "'" + "r" * 78 + "'"), (79, "'" + "r" * 76 + "...")]
)
def test_a_long_field_is_quoted_cut_to_80_characters(length: int, shown: str) -> None:
    with pytest.raises(UpdateRejected) as caught:
        open_(seal(), run_id="r" * length)
    assert str(caught.value) == f"envelope is for run 'run-7', expected run {shown}"


# ---------------------------------------------------------------------------- tamper, truncate


# Every reason a damaged envelope may be rejected with: short and about the stage, never the byte.
DAMAGE_REASONS = (
    "envelope signature invalid",
    "envelope truncated",
    "not a fedlora envelope",
    "unsupported envelope version",
    "unknown envelope suite",
    "envelope length fields",
    "envelope context malformed",
    "envelope from site",
)


def assert_rejected(envelope: bytes, kem: str = "x25519") -> str:
    with pytest.raises(UpdateRejected) as caught:
        open_(envelope, kem)
    reason = str(caught.value)
    assert reason.startswith(DAMAGE_REASONS), reason
    assert "CANARY" not in reason
    return reason


def regions(envelope: bytes) -> dict[str, range]:
    _, _, _, info_len, sealed_len = HEADER.unpack_from(envelope)
    context_end = HEADER.size + info_len
    enc_end = context_end + (sealed_len - len(PAYLOAD) - TAG_BYTES)
    return {
        "header": range(0, HEADER.size),
        "context": range(HEADER.size, context_end),
        "enc": range(context_end, enc_end),
        "ciphertext": range(enc_end, enc_end + len(PAYLOAD) + TAG_BYTES),
        "signature": range(len(envelope) - SIGNATURE_BYTES, len(envelope)),
    }


@pytest.mark.parametrize("kem", KEMS)
@pytest.mark.parametrize("region", ["header", "context", "enc", "ciphertext", "signature"])
def test_flipping_any_bit_pattern_in_any_region_is_rejected(kem: str, region: str) -> None:
    envelope = seal(kem)
    for index in regions(envelope)[region]:
        for mask in (0x01, 0x80):
            damaged = bytearray(envelope)
            damaged[index] ^= mask
            assert_rejected(bytes(damaged), kem)


@pytest.mark.parametrize("kem", KEMS)
def test_every_truncation_is_rejected(kem: str) -> None:
    envelope = seal(kem)
    for length in range(len(envelope)):
        assert_rejected(envelope[:length], kem)
    assert_rejected(envelope + b"\x00", kem)


def test_length_checks_at_their_bounds() -> None:
    envelope = seal()
    shortest = HEADER.size + SIGNATURE_BYTES
    assert assert_rejected(envelope[: shortest - 1]) == "envelope truncated"
    assert assert_rejected(envelope[:shortest]).startswith("envelope length fields do not match")
    sealed = envelope[HEADER.size + len(CONTEXT.info()) : -SIGNATURE_BYTES]
    for info_len, reason in (
        (MAX_CONTEXT_BYTES, "envelope context malformed"),  # within the bound: parsed
        (MAX_CONTEXT_BYTES + 1, "envelope length fields are out of range"),
    ):
        header = HEADER.pack(MAGIC, ENVELOPE_VERSION, SUITE_X25519, info_len, len(sealed))
        assert assert_rejected(resign(header + bytes(info_len) + sealed)) == reason
    # HPKE output shorter than the KEM's enc plus the tag: refused before decryption.
    info, shortest_sealed = CONTEXT.info(), ENC_BYTES["x25519"] + TAG_BYTES
    for length, reason in (
        (shortest_sealed - 1, "envelope length fields are out of range"),
        (shortest_sealed, "envelope cannot be opened: sealed to another coordinator key or"),
    ):
        header = HEADER.pack(MAGIC, ENVELOPE_VERSION, SUITE_X25519, len(info), length)
        with pytest.raises(UpdateRejected, match=f"^{re.escape(reason)}"):
            open_(resign(header + info + sealed[:length]))


def test_oversize_is_rejected_before_parsing() -> None:
    envelope = seal()
    with pytest.raises(UpdateRejected, match="exceeds the bound of"):
        open_delta(envelope, COORDINATOR["x25519"], ALLOW, CONTEXT, len(envelope) - 1)
    # Garbage that would fail parsing is refused for its size first: nothing was read.
    with pytest.raises(UpdateRejected, match=r"^envelope of 4096 bytes exceeds the bound of 100"):
        open_delta(os.urandom(4096), COORDINATOR["x25519"], ALLOW, CONTEXT, 100)
    assert open_delta(envelope, COORDINATOR["x25519"], ALLOW, CONTEXT, len(envelope)) == PAYLOAD


@pytest.mark.parametrize(
    "garbage",
    [b"", b"FLE1", MAGIC + bytes(200), os.urandom(1000), b"\x00" * 76, b"PK\x03\x04" * 100],
)
def test_garbage_is_rejected(garbage: bytes) -> None:
    assert_rejected(garbage)


@pytest.mark.parametrize("wrong_type", ["text", bytearray(b"FLE1"), memoryview(b"FLE1"), None])
def test_non_bytes_is_rejected(wrong_type: object) -> None:
    kind = type(wrong_type).__name__
    with pytest.raises(UpdateRejected, match=f"^envelope is {kind}, expected bytes$"):
        open_(wrong_type)  # type: ignore[arg-type]


def test_unknown_version_and_suite() -> None:
    envelope = bytearray(seal())
    envelope[4] = 2
    assert assert_rejected(bytes(envelope)) == "unsupported envelope version 2"
    envelope[4], envelope[5] = ENVELOPE_VERSION, 9
    assert assert_rejected(bytes(envelope)) == "unknown envelope suite 9"


# ---------------------------------------------------------------------------- property


MUTATIONS: list[Callable[[bytes, int, int], bytes]] = [
    lambda env, i, b: env[:i] + bytes([env[i] ^ (b or 1)]) + env[i + 1 :],  # change a byte
    lambda env, i, b: env[:i] + env[i + 1 :],  # delete a byte
    lambda env, i, b: env[:i] + bytes([b]) + env[i:],  # insert a byte
    lambda env, i, b: env[:i],  # truncate
    lambda env, i, b: env[i:],  # drop a prefix
]


ENVELOPES = {kem: seal(kem) for kem in KEMS}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kem=st.sampled_from(KEMS),
    steps=st.lists(
        st.tuples(st.integers(0, len(MUTATIONS) - 1), st.integers(0, 2**20), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_no_mutation_of_an_envelope_ever_opens(kem: str, steps: list[tuple[int, int, int]]) -> None:
    original = ENVELOPES[kem]
    envelope = original
    for kind, position, value in steps:
        if envelope:
            envelope = MUTATIONS[kind](envelope, position % len(envelope), value)
    if envelope == original:  # mutations that cancel out (flip twice) are not a mutation
        return
    with pytest.raises(UpdateRejected):
        open_(envelope, kem)
