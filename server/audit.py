"""An append-only, hash-chained audit log of what the coordinator saw and did.

``<run-dir>/audit.jsonl`` holds one JSON object per line::

    {"event": "reply-rejected", "hash": "…", "prev": "…", "reason": "…", "seq": 7,
     "site": "site-2", "time": "2026-11-28T10:02:35.123456Z"}

``seq`` counts from 0; ``prev`` is the SHA-256 (hex) of the previous entry's canonical JSON line
(``GENESIS``, 64 zeros, for the first entry); ``hash`` is the SHA-256 of the canonical JSON of
the entry without ``hash``. Editing any field of any entry, deleting, inserting or reordering
lines breaks the chain, and ``verify_chain`` names the line. Deleting lines *at the end* leaves
a valid shorter chain: the registry cross-check (every published version has its
``version-published`` entry) catches that once a later version exists.

Anyone who can write the file can also recompute a whole chain, so the chain alone only shows
accidents. With the coordinator's key (``AuditLog(path, mac_key)``, the key from
``audit_mac_key``), every entry also carries ``mac``, an HMAC-SHA256 of its ``hash`` under a key
derived (HKDF-SHA256) from the coordinator's private key; ``verify_chain(path, mac_key)`` then
names every entry whose MAC is missing or wrong: an edited log fails even after rechaining,
unless the editor also holds the coordinator's private key.

Every append is one ``write`` of a whole line followed by ``fsync``, under an exclusive
``flock`` so that two processes never interleave. A crash during the write can leave a *torn*
final line (no newline). The log then refuses to append, because the chain cannot continue
from a line that does not parse, until ``AuditLog.repair()`` moves the torn bytes to
``audit.jsonl.torn-<UTC time>`` (kept as evidence) and truncates the log after the last
complete line.

Fields are caller-provided, so ``append`` refuses ``bytes`` anywhere and strings longer than
``MAX_STRING_BYTES``: key material and delta payloads never belong in this log.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.atomic import fsync_dir, whole_write, write_bytes_atomic
from common.errors import FedloraError

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
# Longest string field (UTF-8 bytes): a reason or a site id, never a payload.
MAX_STRING_BYTES = 4096
# Longest entry line (bytes); bounds what reading the tail of the log costs.
MAX_ENTRY_BYTES = 64 * 1024
RESERVED = frozenset({"seq", "time", "event", "prev", "hash"})
MAC_FIELD = "mac"  # present only in a log written with the coordinator's key
_MAC_KEY_INFO = b"fedlora audit-log hmac-sha256 v1"
_EVENT_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}")
_TAIL_CHUNK = 64 * 1024  # bytes read per step when looking for the last line

# The events the coordinator records (kebab-case, like Flower's message keys).
EVENT_RUN_STARTED = "run-started"
EVENT_RUN_RESUMED = "run-resumed"
EVENT_ROUND_STARTED = "round-started"
EVENT_SITE_SEEN = "site-seen"
EVENT_REPLY_ACCEPTED = "reply-accepted"
EVENT_REPLY_REJECTED = "reply-rejected"
EVENT_VERSION_PUBLISHED = "version-published"
EVENT_ROUND_COMPLETED = "round-completed"
EVENT_RUN_STOPPED = "run-stopped"
EVENT_ROUND_FAILED = "round-failed"
# federation.fraction-*: the sites a stage of a round instructs, and how many were available.
EVENT_COHORT_SAMPLED = "cohort-sampled"


class AuditError(FedloraError):
    """The audit log cannot be appended to (torn or corrupt tail), or a field is refused."""


@dataclass(frozen=True)
class TornTail:
    """Bytes after the last newline of the log: a line cut short by a crash."""

    offset: int  # byte offset where the torn line starts
    size: int  # bytes in the torn line


def canonical_json(value: Any) -> bytes:
    """The one serialization that is hashed: sorted keys, no spaces, ASCII, no NaN."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)  # fmt: skip
    return text.encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of ``entry`` without its ``hash`` and ``mac`` fields."""
    return sha256_hex(canonical_json({k: v for k, v in entry.items() if k not in _UNHASHED}))


_UNHASHED = frozenset({"hash", MAC_FIELD})


def audit_mac_key(secret: bytes) -> bytes:
    """The 32-byte HMAC key of the audit log, derived from the coordinator's private key bytes.

    HKDF-SHA256 with a fixed label, so the log key is never the key itself and is the same
    every time the coordinator (or an operator verifying with its key) starts.
    """
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_KEY_INFO).derive(secret)


def entry_mac(mac_key: bytes, entry_hash_hex: str) -> str:
    """HMAC-SHA256 (hex) of an entry's ``hash``, which covers every other field and ``prev``."""
    return hmac.new(mac_key, entry_hash_hex.encode("ascii"), hashlib.sha256).hexdigest()


def utc_now() -> str:
    """The current UTC time as ISO 8601 with microseconds and a ``Z``."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


def clip_text(text: str, limit: int = MAX_STRING_BYTES) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, saying how long it was.

    For strings a remote party controls (a site id, a rejection reason quoting a reply):
    ``append`` refuses an over-long string, and a hostile site must not stop the round loop.
    """
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    marker = f"... ({len(data)} bytes in all)"
    return data[: limit - len(marker)].decode("utf-8", errors="ignore") + marker


def check_field(name: str, value: Any) -> None:
    """Refuse a field value that is not plain JSON, holds bytes, or an over-long string.

    Raises
    ------
    AuditError
        Naming the field (``name``, with ``[i]`` / ``.key`` for nested values).
    """
    if isinstance(value, bytes | bytearray | memoryview):
        raise AuditError(
            f"audit field {name!r} is {type(value).__name__}: never log key material or "
            "delta bytes (log a SHA-256 or a size instead)"
        )
    if isinstance(value, str):
        if len(value.encode("utf-8")) > MAX_STRING_BYTES:
            raise AuditError(f"audit field {name!r}: string longer than {MAX_STRING_BYTES} bytes")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(f"audit field {name!r}: {value} is not a finite number")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_field(f"{name}[{i}]", item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"audit field {name!r}: key {key!r} is not a string")
            check_field(f"{name}.{key}", item)
    elif value is not None and not isinstance(value, bool | int):
        raise AuditError(
            f"audit field {name!r}: {type(value).__name__} is not JSON "
            "(expected None, bool, int, float, str, list or dict)"
        )


def _read_tail(fd: int) -> tuple[bytes | None, TornTail | None]:
    """The last complete line (without newline, None if there is none) and any torn tail."""
    size = os.fstat(fd).st_size
    start, data = size, b""
    while start > 0 and data.count(b"\n") < 2:
        step = min(_TAIL_CHUNK, start)
        start -= step
        data = os.pread(fd, step, start) + data
    cut = data.rfind(b"\n")
    torn = None if cut == len(data) - 1 else TornTail(start + cut + 1, len(data) - cut - 1)
    if cut < 0:
        return None, torn
    previous = data.rfind(b"\n", 0, cut)
    return data[previous + 1 : cut], torn


class AuditLog:
    """The audit log at ``path`` (created on the first append), continuing its hash chain.

    Parameters
    ----------
    path : Path
        Usually ``<run-dir>/audit.jsonl``.

    Attributes
    ----------
    torn : TornTail or None
        Set when the log ended in a torn line as this object looked at it; ``append`` refuses
        until ``repair()`` is called.
    """

    def __init__(self, path: Path, mac_key: bytes | None = None) -> None:
        self.path = Path(path)
        self.mac_key = mac_key
        self.torn: TornTail | None = None
        if self.path.exists():
            with self._locked() as fd:
                _, self.torn = _read_tail(fd)
            if self.torn is not None:
                logger.warning(
                    "%s ends in a torn line (%d bytes at offset %d, no newline): a crash cut "
                    "it short; AuditLog.repair() moves it aside",
                    self.path, self.torn.size, self.torn.offset,
                )  # fmt: skip

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """The log's descriptor (append mode, created if missing) under an exclusive lock."""
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if created:
                fsync_dir(self.path.parent)  # the new file's name must survive a crash too
            yield fd
        finally:
            os.close(fd)  # closing releases the lock

    def _next_link(self, fd: int) -> tuple[int, str]:
        """``(seq, prev)`` for the next entry, from the log's last line."""
        last, self.torn = _read_tail(fd)
        if self.torn is not None:
            raise AuditError(
                f"{self.path}: the last line is torn ({self.torn.size} bytes without a newline "
                f"at offset {self.torn.offset}); call AuditLog.repair() before appending"
            )
        if last is None:
            return 0, GENESIS
        try:
            entry = json.loads(last)
            return int(entry["seq"]) + 1, sha256_hex(canonical_json(entry))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"{self.path}: the last line does not parse ({exc}); the chain cannot continue. "
                "Run verify_chain and restore the log from a copy"
            ) from exc

    @whole_write
    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry and fsync it.

        Parameters
        ----------
        event : str
            Kebab-case event name, e.g. ``EVENT_REPLY_REJECTED`` (``"reply-rejected"``).
        **fields
            Plain JSON values (no bytes, strings up to ``MAX_STRING_BYTES``); the names
            ``seq``, ``time``, ``event``, ``prev``, ``hash`` and ``mac`` are reserved.

        Returns
        -------
        dict
            The entry as written, with ``seq``, ``time``, ``prev`` and ``hash``.

        Raises
        ------
        AuditError
            For a refused event name or field, or a torn or unparsable last line.
        """
        if not _EVENT_NAME.fullmatch(event):
            raise AuditError(f"audit event {event!r}: expected kebab-case, e.g. 'site-seen'")
        for name, value in fields.items():
            if name in RESERVED or name == MAC_FIELD:
                raise AuditError(f"audit field {name!r} is reserved ({sorted(RESERVED)}, mac)")
            check_field(name, value)
        with self._locked() as fd:
            seq, prev = self._next_link(fd)
            entry: dict[str, Any] = {**fields, "event": event, "seq": seq, "time": utc_now()}
            entry["prev"] = prev
            entry["hash"] = entry_hash(entry)
            if self.mac_key is not None:
                entry[MAC_FIELD] = entry_mac(self.mac_key, entry["hash"])
            line = canonical_json(entry) + b"\n"
            if len(line) > MAX_ENTRY_BYTES:
                raise AuditError(f"audit entry {event!r}: {len(line)} bytes > {MAX_ENTRY_BYTES}")
            os.write(fd, line)  # O_APPEND: one write at the end of the file
            os.fsync(fd)
        return entry

    def repair(self) -> Path | None:
        """Move a torn final line to ``<log>.torn-<UTC time>`` and cut the log before it.

        Returns
        -------
        Path or None
            The file now holding the torn bytes, or None when the log was not torn.
        """
        if not self.path.exists():
            return None
        with self._locked() as fd:
            _, torn = _read_tail(fd)
            if torn is None:
                self.torn = None
                return None
            data = os.pread(fd, torn.size, torn.offset)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            aside = self.path.with_name(f"{self.path.name}.torn-{stamp}")
            write_bytes_atomic(aside, data)  # the evidence is safe before the log is cut
            os.ftruncate(fd, torn.offset)
            os.fsync(fd)
        logger.warning("moved a torn line of %d bytes from %s to %s", torn.size, self.path, aside)
        self.torn = None
        return aside


def _check_entry(
    number: int, entry: Any, before: dict[str, Any] | None, linked: bool, mac_key: bytes | None
) -> list[str]:
    """Problems of one parsed line (1-based ``number``).

    ``before`` is the entry of the line before (None for line 1); ``linked`` is False when that
    line did not parse, so the link to it cannot be checked. With ``mac_key``, the entry's MAC
    must verify.
    """
    where = f"line {number}"
    if not isinstance(entry, dict):
        return [f"{where}: not a JSON object"]
    missing = sorted(RESERVED - set(entry))
    if missing:
        return [f"{where}: missing {missing}"]
    problems = []
    if entry["hash"] != entry_hash(entry):
        problems.append(f"{where}: hash does not match the entry (an entry field was edited)")
    if mac_key is not None:
        mac = entry.get(MAC_FIELD)
        if not isinstance(mac, str) or not hmac.compare_digest(
            mac, entry_mac(mac_key, str(entry["hash"]))
        ):
            what = "has no MAC" if mac is None else "has a MAC that does not verify"
            problems.append(
                f"{where}: {what} under the coordinator's key (written or rewritten without it)"
            )
    if not linked:
        return problems
    expected_prev = GENESIS if before is None else sha256_hex(canonical_json(before))
    if entry["prev"] != expected_prev:
        what = "the genesis value" if before is None else f"line {number - 1}"
        problems.append(
            f"{where}: prev does not match {what} (a line was deleted, inserted or reordered, "
            "or prev was edited)"
        )
    expected_seq = 0 if before is None else int(before["seq"]) + 1
    if entry["seq"] != expected_seq:
        problems.append(f"{where}: seq {entry['seq']!r}, expected {expected_seq} (not monotonic)")
    return problems


def _scan(path: Path, mac_key: bytes | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Parsed entries (unparsable lines skipped) and the chain's problems."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc}") from exc
    lines = data.split(b"\n")
    problems: list[str] = []
    if lines[-1]:
        problems.append(
            f"line {len(lines)}: torn final line ({len(lines[-1])} bytes, no newline); "
            "AuditLog.repair() moves it aside"
        )
    entries: list[dict[str, Any]] = []
    before: Any = None
    linked = True
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            entry = json.loads(raw)
        except ValueError as exc:
            problems.append(f"line {number}: unparsable JSON ({exc})")
            linked = False
            continue
        try:
            problems += _check_entry(number, entry, before, linked, mac_key)
        except (TypeError, ValueError, KeyError) as exc:  # e.g. seq = "7" or a list
            problems.append(f"line {number}: malformed entry ({exc!r})")
        linked = isinstance(entry, dict) and isinstance(entry.get("seq"), int)
        if isinstance(entry, dict):
            entries.append(entry)
        before = entry
    return entries, problems


def verify_chain(path: Path, mac_key: bytes | None = None) -> list[str]:
    """Check the hash chain of an audit log, and with ``mac_key`` every entry's MAC.

    Returns
    -------
    list of str
        One line per problem, each naming its 1-based line number (broken ``prev`` link,
        wrong ``hash``, non-monotonic ``seq``, unparsable or torn line, missing or wrong MAC);
        empty when intact.

    Raises
    ------
    AuditError
        When the file cannot be read.
    """
    return _scan(path, mac_key)[1]


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of an audit log that parse (check them with ``verify_chain`` first)."""
    return _scan(path)[0]
