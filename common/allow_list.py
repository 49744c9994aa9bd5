"""The allow-list: which sites are enrolled, and the Ed25519 public key each one signs with.

Stored either as a JSON file ``{"format": "fedlora-allow-list/1", "sites": {site: key}}``
where a key is 64 hex characters (raw Ed25519 public key) or a PEM block, or as a folder of
``<site>.pub`` files. ``add_site`` enrolls a site; an enrolled key is replaced only on request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.atomic import write_json_atomic
from common.keys import (
    PUBLIC_FILE_MODE,
    PUBLIC_SUFFIX,
    KeyMaterialError,
    UnknownSite,
    check_site_id,
    key_pem,
    load_site_public,
    write_new_file,
)

ALLOW_LIST_FORMAT = "fedlora-allow-list/1"
# Largest allow-list JSON read (bytes): about 100 000 sites.
MAX_ALLOW_LIST_BYTES = 16 * 2**20
_RAW_ED25519_HEX = re.compile(r"[0-9a-fA-F]{64}")


class AllowList:
    """The enrolled sites: site id -> Ed25519 public key. ``repr`` lists ids, never keys."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], source: Path | None = None) -> None:
        seen: dict[bytes, str] = {}
        for site_id, key in keys.items():
            check_site_id(site_id)
            # Two sites sharing a key could each sign as the other: refuse the enrollment.
            raw = key.public_bytes_raw()
            if raw in seen:
                raise KeyMaterialError(
                    f"sites {seen[raw]!r} and {site_id!r} share one public key in allow-list "
                    f"{source}; every site needs its own key"
                )
            seen[raw] = site_id
        self._keys = dict(keys)
        self.source = source

    def public_key(self, site_id: str) -> Ed25519PublicKey:
        """The enrolled key of ``site_id``; ``UnknownSite`` if it is not enrolled."""
        try:
            return self._keys[site_id]
        except KeyError:
            raise UnknownSite(site_id, self.source) from None

    def __contains__(self, site_id: object) -> bool:
        return site_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __repr__(self) -> str:
        return f"AllowList({len(self)} sites: {', '.join(self)})"


def _parse_site_key(text: object, where: str) -> Ed25519PublicKey:
    """An allow-list entry: 64 hex characters (raw key) or an Ed25519 PEM block."""
    if not isinstance(text, str):
        raise KeyMaterialError(f"{where}: expected a hex or PEM string, got {type(text).__name__}")
    try:
        if _RAW_ED25519_HEX.fullmatch(text.strip()):
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.strip()))
        key = serialization.load_pem_public_key(text.encode("utf-8"))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyMaterialError(f"{where}: not a readable Ed25519 public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyMaterialError(f"{where}: a {type(key).__name__}, expected an Ed25519 key")
    return key


def _read_allow_list_json(path: Path) -> dict[str, Ed25519PublicKey]:
    try:
        size = path.stat().st_size
        if size > MAX_ALLOW_LIST_BYTES:
            raise KeyMaterialError(f"allow-list {path} is {size} bytes, over the bound")
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise KeyMaterialError(f"allow-list {path} does not exist") from None
    except (OSError, ValueError, RecursionError):
        raise KeyMaterialError(f"allow-list {path} is not readable JSON") from None
    sites = document.get("sites") if isinstance(document, dict) else None
    if not isinstance(sites, dict) or document.get("format") != ALLOW_LIST_FORMAT:
        raise KeyMaterialError(
            f'allow-list {path}: expected {{"format": "{ALLOW_LIST_FORMAT}", "sites": {{...}}}}'
        )
    return {
        site: _parse_site_key(text, f"allow-list {path}, site {site!r}")
        for site, text in sites.items()
    }


def load_allow_list(path: Path) -> AllowList:
    """Load an allow-list: a JSON file, or a folder whose ``<site>.pub`` files are the keys."""
    path = Path(path)
    if path.is_dir():
        keys = {
            entry.name.removesuffix(PUBLIC_SUFFIX): load_site_public(entry)
            for entry in sorted(path.glob(f"*{PUBLIC_SUFFIX}"))
        }
    else:
        keys = _read_allow_list_json(path)
    return AllowList(keys, source=path)


def add_site(path: Path, site_id: str, public_key_path: Path, replace: bool = False) -> Path:
    """Enroll ``site_id`` with the Ed25519 key in ``public_key_path``; return the file written.

    ``path`` is an existing folder (the key is copied to ``<site_id>.pub`` there) or a
    ``.json`` allow-list, created if missing. Enrolling the same key again changes nothing;
    a site already enrolled with another key is refused unless ``replace`` (rotating a key
    is a deliberate act).
    """
    path, site_id = Path(path), check_site_id(site_id)
    key = load_site_public(Path(public_key_path))
    if path.is_dir():
        current, target = load_allow_list(path), path / f"{site_id}{PUBLIC_SUFFIX}"
    elif path.suffix == ".json":
        current = load_allow_list(path) if path.exists() else AllowList({}, source=path)
        target = path
    else:
        raise KeyMaterialError(
            f"allow-list {path} is neither a folder nor a .json file; name a .json file to "
            "create one, or an existing folder of <site>.pub files"
        )
    if site_id in current:
        if current.public_key(site_id).public_bytes_raw() == key.public_bytes_raw():
            return target
        if not replace:
            raise KeyMaterialError(
                f"site {site_id!r} is already enrolled in {path} with another key; "
                "pass --replace to rotate it"
            )
    updated = {s: current.public_key(s) for s in current if s != site_id} | {site_id: key}
    AllowList(updated, source=path)  # refuses a key already enrolled for another site
    if target == path:
        sites = {s: k.public_bytes_raw().hex() for s, k in sorted(updated.items())}
        write_json_atomic(path, {"format": ALLOW_LIST_FORMAT, "sites": sites})
    else:
        write_new_file(target, key_pem(key), PUBLIC_FILE_MODE, replace=True)
    return target
