"""The enrollment authority's signed roster of site keys (``common.roster``)."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.keys import KeyMaterialError
from common.roster import MAX_ROSTER_BYTES, parse_roster, roster_bytes

AUTHORITY = Ed25519PrivateKey.generate()
SITES = {name: Ed25519PrivateKey.generate() for name in ("a", "b", "c")}


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _roster() -> bytes:
    return roster_bytes({s: k.public_key() for s, k in SITES.items()}, AUTHORITY)


def test_roster_round_trips_every_key() -> None:
    parsed = parse_roster(_roster(), AUTHORITY.public_key())
    assert sorted(parsed) == ["a", "b", "c"]
    for site, key in SITES.items():
        raw = parsed[site].public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert raw == _raw(key)


def test_roster_signed_by_another_key_is_refused() -> None:
    """What a coordinator that writes its own roster would produce."""
    forged = roster_bytes({"a": Ed25519PrivateKey.generate().public_key()}, AUTHORITY)
    with pytest.raises(KeyMaterialError, match="not signed by the pinned enrollment key"):
        parse_roster(forged, Ed25519PrivateKey.generate().public_key())


def test_substituted_key_breaks_the_signature() -> None:
    data = _roster()
    body, signature = data[:-64], data[-64:]
    parsed = json.loads(body)
    parsed["sites"]["b"] = _raw(Ed25519PrivateKey.generate()).hex()
    body = json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(KeyMaterialError, match="not signed"):
        parse_roster(body + signature, AUTHORITY.public_key())


@pytest.mark.parametrize("data", [b"", b"x" * 64, b"x" * (MAX_ROSTER_BYTES + 1)])
def test_empty_short_or_oversized_roster_is_refused(data: bytes) -> None:
    with pytest.raises(KeyMaterialError, match="missing, empty or oversized"):
        parse_roster(data, AUTHORITY.public_key())


def test_signed_but_malformed_roster_is_refused() -> None:
    body = b'{"format":"fedlora-roster/1","sites":{"../x":"00"}}'
    signed = body + AUTHORITY.sign(b"fedlora-roster/1 signature\x00" + body)
    with pytest.raises(KeyMaterialError, match="malformed"):
        parse_roster(signed, AUTHORITY.public_key())
