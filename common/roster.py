"""The signed roster: every enrolled site's identity key, signed by the enrollment authority.

Secure sum protects a site's delta from the coordinator only if each site checks its
neighbours' key adverts itself: a coordinator that may hand out adverts unchecked can put its
own keys in place of every neighbour of a victim and unmask the victim's input alone. A site
cannot take the neighbours' keys from the coordinator either. So the authority that enrolls
sites (``fedlora keys init`` / ``add-site``, beside the private CA, kept offline) signs the
list of enrolled sites' Ed25519 keys with its own Ed25519 *enrollment key*; every site bundle
pins its public half (``enroll.pub``). The coordinator only relays the signed roster (in every
secure-sum instruction), and each site verifies it and then every neighbour's advert against
it (``common.secagg_client.SecAggSite(peer_keys=...)``).

Format: ``{"format": "fedlora-roster/2", "serial": n, "sites": {site id: 64 hex of the raw
public key}}`` as canonical JSON (sorted keys, no spaces), followed by the 64-byte Ed25519
signature over ``DOMAIN + that JSON``. The coordinator cannot add, drop or replace a key without
the enrollment key.

Freshness: each re-signing (``add-site``, a key rotation) raises ``serial`` by one, and a site
remembers the highest serial it has accepted (``client.roster_serial``), so a coordinator
cannot relay an older roster, for example one from before a site's key was rotated. A
``fedlora-roster/1`` roster (written before serials) reads as serial 0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.atomic import write_bytes_atomic
from common.keys import KeyMaterialError, check_site_id

ROSTER_FORMAT = "fedlora-roster/2"
_OLD_FORMAT = "fedlora-roster/1"  # no serial: reads as serial 0
ROSTER_FILE = "roster.signed"
ENROLL_KEY_ID = "enroll"
ENROLL_KEY_NAME = f"{ENROLL_KEY_ID}.key"
ENROLL_PUBLIC_NAME = f"{ENROLL_KEY_ID}.pub"
# Largest roster read (bytes): about 100 000 sites.
MAX_ROSTER_BYTES = 16 * 2**20

_DOMAIN = b"fedlora-roster/1 signature\x00"
_SIGNATURE_BYTES = 64


def _raw(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def roster_bytes(
    sites: Mapping[str, Ed25519PublicKey], enroll_key: Ed25519PrivateKey, serial: int = 1
) -> bytes:
    """The signed roster of ``sites`` (site id -> identity key), number ``serial``."""
    if type(serial) is not int or serial < 1:
        raise KeyMaterialError(f"a roster serial is a positive integer, not {serial!r}")
    body = json.dumps(
        {
            "format": ROSTER_FORMAT,
            "serial": serial,
            "sites": {check_site_id(s): _raw(k) for s, k in sites.items()},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return body + enroll_key.sign(_DOMAIN + body)


def write_roster(
    path: Path, sites: Mapping[str, Ed25519PublicKey], enroll_key: Ed25519PrivateKey
) -> Path:
    """Write the signed roster of ``sites`` to ``path`` (atomically, replacing an older one),
    with the serial after the one ``path`` holds (1 for the first)."""
    path = Path(path)
    serial = roster_serial(path.read_bytes(), enroll_key.public_key()) if path.exists() else 0
    write_bytes_atomic(path, roster_bytes(sites, enroll_key, serial + 1))
    return path


def _verified_body(data: bytes, enroll_key: Ed25519PublicKey) -> bytes:
    """The roster's JSON body, if ``enroll_key`` signed it."""
    if not isinstance(data, bytes) or not _SIGNATURE_BYTES < len(data) <= MAX_ROSTER_BYTES:
        raise KeyMaterialError("the site roster is missing, empty or oversized")
    body, signature = data[:-_SIGNATURE_BYTES], data[-_SIGNATURE_BYTES:]
    try:
        enroll_key.verify(signature, _DOMAIN + body)
    except InvalidSignature:
        raise KeyMaterialError(
            f"the site roster is not signed by the pinned enrollment key ({ENROLL_PUBLIC_NAME}): "
            "the coordinator cannot be trusted with the neighbours' keys this round"
        ) from None
    return body


def _serial(body: bytes) -> int:
    try:
        parsed = json.loads(body)
        if parsed["format"] == _OLD_FORMAT:
            return 0
        if parsed["format"] != ROSTER_FORMAT:
            raise ValueError(f"format {parsed['format']!r}")
        serial = parsed["serial"]
        if type(serial) is not int or serial < 1:
            raise ValueError(f"serial {serial!r}")
        return serial
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyMaterialError(f"the site roster is malformed: {exc}") from None


def roster_serial(data: bytes, enroll_key: Ed25519PublicKey) -> int:
    """The serial of a signed roster (0 for a ``fedlora-roster/1`` one), if ``enroll_key``
    signed it; ``KeyMaterialError`` as ``parse_roster``."""
    return _serial(_verified_body(data, enroll_key))


def parse_roster(data: bytes, enroll_key: Ed25519PublicKey) -> dict[str, Ed25519PublicKey]:
    """The enrolled sites' keys from a signed roster, if ``enroll_key`` signed it.

    Raises
    ------
    KeyMaterialError
        The roster is oversized, malformed, or its signature does not verify.
    """
    body = _verified_body(data, enroll_key)
    _serial(body)  # the format and serial are checked too
    try:
        parsed = json.loads(body)
        return {
            check_site_id(site): Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw))
            for site, raw in parsed["sites"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError, KeyMaterialError) as exc:
        raise KeyMaterialError(f"the site roster is malformed: {exc}") from None
