"""Key material on disk: the coordinator's HPKE key pair and the sites' identity keys.

Every key file is PEM (standard PKCS#8 / SubjectPublicKeyInfo blocks, readable by any tool that
knows the algorithm).

``coordinator.key`` (mode 0600)
    Unencrypted PKCS#8. KEM ``x25519``: one X25519 block. KEM ``mlkem768-x25519``: an
    ML-KEM-768 block (FIPS 203 64-byte seed form) followed by an X25519 block; cryptography 50
    serialises each half but not the hybrid ``MLKEM768X25519PrivateKey`` itself, so the file
    holds the two halves in this fixed order and the loader rebuilds the hybrid key.
``coordinator.pub`` (mode 0644)
    SubjectPublicKeyInfo block(s) in the same order; every site needs it to seal.
``<site>.key`` (0600) / ``<site>.pub`` (0644)
    A site's Ed25519 identity key (PKCS#8) and its public half (SubjectPublicKeyInfo).
Allow-list (enrollment)
    A JSON file or a folder of ``<site>.pub`` files: see ``common.allow_list``.

Private keys are written atomically with mode 0600 and never overwritten; a private key file
readable by group or others is refused. Nothing here logs or prints key bytes: the key
classes' ``repr`` shows the KEM and a SHA-256 fingerprint of the public half only.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import MLKEM768X25519PrivateKey, MLKEM768X25519PublicKey

from common.atomic import fsync_dir
from common.config import SITE_ID_PATTERN
from common.errors import FedloraError

Kem = Literal["x25519", "mlkem768-x25519"]
KEMS: tuple[str, ...] = get_args(Kem)

COORDINATOR_KEY_NAME = "coordinator.key"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"

# Largest key file read (bytes); real ones are under 2 KiB, so anything bigger is not a key.
MAX_KEY_FILE_BYTES = 64 * 1024
PUBLIC_FILE_MODE = 0o644
_PRIVATE_FILE_MODE = 0o600
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


class KeyMaterialError(FedloraError):
    """A key or allow-list file is missing, unreadable, exposed, or holds the wrong key type."""


class UnknownSite(KeyMaterialError):
    """A site id is not enrolled in the allow-list."""

    def __init__(self, site_id: str, source: Path | None) -> None:
        where = f" {source}" if source is not None else ""
        super().__init__(
            f"site {site_id!r} is not in the allow-list{where}; enroll it with "
            f"`fedlora keys enroll --allow-list FILE {site_id} SITE.pub`"
        )
        self.site_id = site_id


def check_site_id(site_id: str) -> str:
    """Return ``site_id`` if it is a valid site id, else raise ``KeyMaterialError``."""
    if not isinstance(site_id, str) or not SITE_ID_PATTERN.fullmatch(site_id):
        raise KeyMaterialError(
            f"invalid site id {site_id!r}: expected 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return site_id


@dataclass(frozen=True, repr=False, eq=False)
class CoordinatorPublicKey:
    """The coordinator's HPKE recipient key; ``mlkem_key`` is set for the hybrid KEM."""

    x25519_key: X25519PublicKey
    mlkem_key: MLKEM768PublicKey | None = None

    @property
    def kem(self) -> Kem:
        return "x25519" if self.mlkem_key is None else "mlkem768-x25519"

    def hpke_key(self) -> X25519PublicKey | MLKEM768X25519PublicKey:
        """The key object ``hpke.Suite.encrypt`` takes for this KEM."""
        if self.mlkem_key is None:
            return self.x25519_key
        return MLKEM768X25519PublicKey(self.mlkem_key, self.x25519_key)

    def __repr__(self) -> str:
        return f"CoordinatorPublicKey(kem={self.kem!r}, {public_fingerprint(self)})"


@dataclass(frozen=True, repr=False, eq=False)
class CoordinatorPrivateKey:
    """The coordinator's HPKE private key; ``repr`` never shows secret bytes."""

    x25519_key: X25519PrivateKey
    mlkem_key: MLKEM768PrivateKey | None = None

    @property
    def kem(self) -> Kem:
        return "x25519" if self.mlkem_key is None else "mlkem768-x25519"

    def public_key(self) -> CoordinatorPublicKey:
        pq = None if self.mlkem_key is None else self.mlkem_key.public_key()
        return CoordinatorPublicKey(self.x25519_key.public_key(), pq)

    def hpke_key(self) -> X25519PrivateKey | MLKEM768X25519PrivateKey:
        """The key object ``hpke.Suite.decrypt`` takes for this KEM."""
        if self.mlkem_key is None:
            return self.x25519_key
        return MLKEM768X25519PrivateKey(self.mlkem_key, self.x25519_key)

    def secret_bytes(self) -> bytes:
        """The raw private key bytes, for deriving the coordinator's other keys (HKDF)."""
        return self.x25519_key.private_bytes_raw()

    def __repr__(self) -> str:
        fingerprint = public_fingerprint(self.public_key())
        return f"CoordinatorPrivateKey(kem={self.kem!r}, public {fingerprint})"


PrivateKey = CoordinatorPrivateKey | Ed25519PrivateKey
PublicKey = CoordinatorPublicKey | Ed25519PublicKey
# One key object that cryptography serialises to one PEM block.
_Component = (
    Ed25519PrivateKey
    | Ed25519PublicKey
    | X25519PrivateKey
    | X25519PublicKey
    | MLKEM768PrivateKey
    | MLKEM768PublicKey
)
_PUBLIC_COMPONENTS = (Ed25519PublicKey, X25519PublicKey, MLKEM768PublicKey)


def public_fingerprint(key: PublicKey) -> str:
    """``sha256:<hex>`` over the raw public key bytes, to compare keys out of band."""
    if isinstance(key, CoordinatorPublicKey):
        raw = key.x25519_key.public_bytes_raw()
        if key.mlkem_key is not None:
            raw = key.mlkem_key.public_bytes_raw() + raw
    else:
        raw = key.public_bytes_raw()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------- writing files


def write_new_file(path: Path, data: bytes, mode: int, replace: bool = False) -> None:
    """Write ``data`` atomically to a path that must not exist yet, with permissions ``mode``.

    The temp file is created with ``mode`` from the start (``os.open``), so a private key is
    never readable by others, not even for a moment; fsync + rename + folder fsync make it
    durable. An existing file is refused unless ``replace``: overwriting a private key would
    lose it for good.
    """
    if path.exists() and not replace:
        raise KeyMaterialError(f"{path} already exists; move it away first (keys are kept)")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            # os.open's mode is narrowed by the umask; fchmod makes the mode exactly ``mode``.
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def key_pem(key: PrivateKey | PublicKey | _Component) -> bytes:
    """PEM of a key: one PKCS#8 / SubjectPublicKeyInfo block per component, ML-KEM first."""
    if isinstance(key, CoordinatorPrivateKey | CoordinatorPublicKey):
        parts = (key.mlkem_key, key.x25519_key)
        return b"".join(key_pem(part) for part in parts if part is not None)
    if isinstance(key, _PUBLIC_COMPONENTS):
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_path_for(private_path: Path) -> Path:
    """Where the public half of ``private_path`` goes: ``X.key`` -> ``X.pub``."""
    return Path(private_path).with_suffix(PUBLIC_SUFFIX)


def _write_key_pair(private_path: Path, key: PrivateKey) -> Path:
    for path in (private_path, public_path_for(private_path)):
        if path.exists():
            raise KeyMaterialError(f"{path} already exists; move it away first (keys are kept)")
    # A new key folder is private to its owner; an existing one is left as the user set it.
    private_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_new_file(private_path, key_pem(key), _PRIVATE_FILE_MODE)
    write_new_file(public_path_for(private_path), key_pem(key.public_key()), PUBLIC_FILE_MODE)
    return private_path


def generate_coordinator_key(out_dir: Path, kem: Kem = "x25519") -> Path:
    """Create ``out_dir/coordinator.key`` (0600) and ``coordinator.pub``; return the key path.

    Parameters
    ----------
    out_dir
        Folder for the two files (created with mode 0700 if missing).
    kem
        ``"x25519"`` (RFC 9180 DHKEM) or ``"mlkem768-x25519"`` (hybrid post-quantum KEM).
    """
    if kem not in KEMS:
        raise KeyMaterialError(f"unknown KEM {kem!r}, expected one of {KEMS}")
    pq = MLKEM768PrivateKey.generate() if kem == "mlkem768-x25519" else None
    key = CoordinatorPrivateKey(X25519PrivateKey.generate(), pq)
    return _write_key_pair(Path(out_dir) / COORDINATOR_KEY_NAME, key)


def generate_site_key(out_dir: Path, site_id: str) -> Path:
    """Create ``out_dir/<site_id>.key`` (Ed25519, 0600) and ``.pub``; return the key path."""
    check_site_id(site_id)
    key = Ed25519PrivateKey.generate()
    return _write_key_pair(Path(out_dir) / f"{site_id}{PRIVATE_SUFFIX}", key)


# ---------------------------------------------------------------------------- reading files


def _read_key_file(path: Path, private: bool) -> bytes:
    """Read a key file after checking that it exists, is small and (private) is not exposed."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise KeyMaterialError(f"key file {path} is not a regular file")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise KeyMaterialError(f"key file {path} is {info.st_size} bytes, too large for a key")
        if private and info.st_mode & 0o077:
            raise KeyMaterialError(
                f"private key file {path} is readable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`"
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(f"key file {path} does not exist") from None
    except OSError as err:
        raise KeyMaterialError(f"key file {path} cannot be read ({err.strerror})") from None


def _load_components(path: Path, private: bool) -> list[object]:
    """Every PEM block of a key file, loaded by cryptography (no assumption about types yet)."""
    data = _read_key_file(Path(path), private)
    blocks = [match.group(0) for match in _PEM_BLOCK.finditer(data)]
    if not blocks:
        raise KeyMaterialError(f"key file {path} holds no PEM block")
    keys: list[object] = []
    for block in blocks:
        try:
            if private:
                keys.append(serialization.load_pem_private_key(block, password=None))
            else:
                keys.append(serialization.load_pem_public_key(block))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # cryptography's message is generic; ours names the file and never the bytes.
            expected = "unencrypted PKCS#8 PEM" if private else "SubjectPublicKeyInfo PEM"
            raise KeyMaterialError(f"{path} is not a readable key (expected {expected})") from None
    return keys


def _load_private(path: Path) -> PrivateKey:
    """A coordinator or site private key file, whichever it is."""
    keys = _load_components(path, private=True)
    match keys:
        case [Ed25519PrivateKey() as site]:
            return site
        case [X25519PrivateKey() as classic]:
            return CoordinatorPrivateKey(classic)
        case [MLKEM768PrivateKey() as pq, X25519PrivateKey() as classic]:
            return CoordinatorPrivateKey(classic, pq)
    raise KeyMaterialError(f"{path} holds {_describe(keys)}, not a fedlora private key")


def load_public_key(path: Path) -> PublicKey:
    """Load a coordinator or site public key file, whichever it is."""
    keys = _load_components(path, private=False)
    match keys:
        case [Ed25519PublicKey() as site]:
            return site
        case [X25519PublicKey() as classic]:
            return CoordinatorPublicKey(classic)
        case [MLKEM768PublicKey() as pq, X25519PublicKey() as classic]:
            return CoordinatorPublicKey(classic, pq)
    raise KeyMaterialError(f"{path} holds {_describe(keys)}, not a fedlora public key")


def _describe(keys: list[object]) -> str:
    return "a " + " + ".join(type(key).__name__ for key in keys)


def _wrong_kind(path: Path, key: PrivateKey | PublicKey, expected: str) -> KeyMaterialError:
    site = isinstance(key, Ed25519PrivateKey | Ed25519PublicKey)
    found = "a site (Ed25519) key" if site else "the coordinator's key"
    return KeyMaterialError(f"{path} is {found}, expected {expected}")


def load_coordinator_private(path: Path) -> CoordinatorPrivateKey:
    """Load ``coordinator.key``; ``KeyMaterialError`` names the file on any problem."""
    key = _load_private(Path(path))
    if not isinstance(key, CoordinatorPrivateKey):
        raise _wrong_kind(path, key, "the coordinator's private key")
    return key


def load_coordinator_public(path: Path) -> CoordinatorPublicKey:
    """Load ``coordinator.pub``, the key every site seals to."""
    key = load_public_key(Path(path))
    if not isinstance(key, CoordinatorPublicKey):
        raise _wrong_kind(path, key, "the coordinator's public key")
    return key


def load_site_private(path: Path) -> Ed25519PrivateKey:
    """Load a site's Ed25519 identity key (``<site>.key``)."""
    key = _load_private(Path(path))
    if not isinstance(key, Ed25519PrivateKey):
        raise _wrong_kind(path, key, "a site's private key")
    return key


def load_site_public(path: Path) -> Ed25519PublicKey:
    """Load a site's Ed25519 public key (``<site>.pub``)."""
    key = load_public_key(Path(path))
    if not isinstance(key, Ed25519PublicKey):
        raise _wrong_kind(path, key, "a site's public key")
    return key


def export_public(private_path: Path, out_path: Path) -> Path:
    """Write the public half of a coordinator or site private key to ``out_path`` (0644)."""
    key = _load_private(Path(private_path))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_new_file(out_path, key_pem(key.public_key()), PUBLIC_FILE_MODE)
    return out_path
