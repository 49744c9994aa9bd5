"""The enrollment authority's signed roster of site keys (``common.roster``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.keys import KeyMaterialError
from common.roster import MAX_ROSTER_BYTES, parse_roster, roster_bytes, roster_serial, write_roster

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


def test_serial_round_trips_and_an_old_format_roster_reads_as_serial_0() -> None:
    keys = {s: k.public_key() for s, k in SITES.items()}
    assert roster_serial(roster_bytes(keys, AUTHORITY, 7), AUTHORITY.public_key()) == 7
    assert roster_serial(_roster(), AUTHORITY.public_key()) == 1  # the default
    body = json.dumps(
        {"format": "fedlora-roster/1", "sites": {"a": _raw(SITES["a"]).hex()}},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    old = body + AUTHORITY.sign(b"fedlora-roster/1 signature\x00" + body)
    assert roster_serial(old, AUTHORITY.public_key()) == 0
    assert sorted(parse_roster(old, AUTHORITY.public_key())) == ["a"]


@pytest.mark.parametrize("serial", [0, -1, "2", 1.5, True])
def test_a_serial_that_is_not_a_positive_integer_is_refused(serial: object) -> None:
    keys = {s: k.public_key() for s, k in SITES.items()}
    with pytest.raises(KeyMaterialError, match="serial"):
        roster_bytes(keys, AUTHORITY, serial)  # type: ignore[arg-type]
    body = json.dumps(
        {"format": "fedlora-roster/2", "serial": serial, "sites": {}},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    signed = body + AUTHORITY.sign(b"fedlora-roster/1 signature\x00" + body)
    with pytest.raises(KeyMaterialError, match="malformed: serial"):
        parse_roster(signed, AUTHORITY.public_key())


def test_each_rewrite_raises_the_serial(tmp_path: Path) -> None:
    keys = {s: k.public_key() for s, k in SITES.items()}
    path = tmp_path / "roster.signed"
    for expected in (1, 2, 3):
        write_roster(path, keys, AUTHORITY)
        assert roster_serial(path.read_bytes(), AUTHORITY.public_key()) == expected
