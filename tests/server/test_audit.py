"""Audit log: hash chain roundtrip, tamper detection with line numbers, torn tail, field guard."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from server.audit import (
    EVENT_REPLY_ACCEPTED,
    EVENT_REPLY_REJECTED,
    EVENT_RUN_STARTED,
    EVENT_SITE_SEEN,
    EVENT_VERSION_PUBLISHED,
    GENESIS,
    AuditError,
    AuditLog,
    canonical_json,
    clip_text,
    entry_hash,
    read_entries,
    sha256_hex,
    verify_chain,
)


def _write_log(path: Path) -> list[dict[str, object]]:
    log = AuditLog(path)
    return [
        log.append(EVENT_RUN_STARTED, run_id="r1", fingerprint="ab" * 32),
        log.append(EVENT_SITE_SEEN, site="site-0", node_id=7),
        log.append(EVENT_REPLY_ACCEPTED, site="site-0", round=1, examples=40),
        log.append(EVENT_REPLY_REJECTED, site="site-1", round=1, reason="fingerprint differs"),
        log.append(EVENT_VERSION_PUBLISHED, module="shared", version=1, sha256="cd" * 32),
    ]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_chain_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = _write_log(path)
    assert verify_chain(path) == []
    entries = read_entries(path)
    assert entries == written
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["prev"] == GENESIS
    for before, entry in itertools.pairwise(entries):
        assert entry["prev"] == sha256_hex(_lines(path)[before["seq"]].rstrip("\n").encode())
    for entry in entries:
        assert entry["hash"] == entry_hash(entry)
        assert str(entry["time"]).endswith("Z")
    assert entries[3]["reason"] == "fingerprint differs"


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    entry = AuditLog(path).append("round-started", round=2)
    assert entry["seq"] == 5
    assert entry["prev"] == sha256_hex(canonical_json(read_entries(path)[4]))
    assert verify_chain(path) == []


@pytest.mark.parametrize("line", range(5))
@pytest.mark.parametrize("field", ["seq", "time", "event", "prev", "hash", "extra"])
def test_editing_any_field_of_any_entry_is_detected(tmp_path: Path, line: int, field: str) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    entry = json.loads(lines[line])
    if field == "extra":  # the caller's field of each entry
        field = next(k for k in entry if k not in {"seq", "time", "event", "prev", "hash"})
    value = entry[field]
    entry[field] = value + 1 if isinstance(value, int) else str(value)[:-1] + "X"
    lines[line] = canonical_json(entry).decode() + "\n"
    path.write_text("".join(lines))
    problems = verify_chain(path)
    assert any(p.startswith(f"line {line + 1}:") for p in problems), problems


def test_edited_prev_is_detected_even_with_a_recomputed_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    entry = json.loads(lines[2])
    entry["prev"] = "1" * 64
    entry["hash"] = entry_hash(entry)  # a forger who knows the scheme
    lines[2] = canonical_json(entry).decode() + "\n"
    path.write_text("".join(lines))
    problems = verify_chain(path)
    assert any(p.startswith("line 3: prev does not match line 2") for p in problems), problems
    # The forged line's own bytes changed, so the next link breaks too.
    assert any(p.startswith("line 4: prev") for p in problems), problems


@pytest.mark.parametrize("deleted", range(4))
def test_deleting_a_line_is_detected(tmp_path: Path, deleted: int) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    del lines[deleted]
    path.write_text("".join(lines))
    problems = verify_chain(path)
    assert any(p.startswith(f"line {deleted + 1}: prev") for p in problems), problems
    assert any("seq" in p and p.startswith(f"line {deleted + 1}:") for p in problems), problems


def test_reordering_lines_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))
    problems = verify_chain(path)
    assert any(p.startswith("line 2: prev") for p in problems), problems
    assert any(p.startswith("line 3: prev") for p in problems), problems


def test_unparsable_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[1] = "{not json\n"
    path.write_text("".join(lines))
    problems = verify_chain(path)
    assert problems[0].startswith("line 2: unparsable JSON")
    assert AuditLog(path).append("round-started", round=2)["seq"] == 5  # the tail is fine


def test_torn_final_line_is_reported_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    intact = path.read_bytes()
    torn_bytes = b'{"event":"reply-accepted","seq":5,"si'
    path.write_bytes(intact + torn_bytes)  # a crash in the middle of a write
    assert verify_chain(path) == [
        f"line 6: torn final line ({len(torn_bytes)} bytes, no newline); "
        "AuditLog.repair() moves it aside"
    ]
    log = AuditLog(path)
    assert log.torn is not None and log.torn.size == len(torn_bytes)
    with pytest.raises(AuditError, match=r"torn .*repair\(\)"):
        log.append("round-started", round=2)
    aside = log.repair()
    assert aside is not None and aside.name.startswith("audit.jsonl.torn-")
    assert aside.read_bytes() == torn_bytes
    assert path.read_bytes() == intact
    assert log.torn is None and log.repair() is None
    assert log.append("round-started", round=2)["seq"] == 5
    assert verify_chain(path) == []


def test_torn_first_line_repairs_to_an_empty_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"ev')
    log = AuditLog(path)
    assert log.torn is not None
    assert log.repair() is not None
    assert log.append(EVENT_RUN_STARTED)["prev"] == GENESIS


def test_unparsable_last_line_refuses_to_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    path.write_bytes(path.read_bytes() + b"garbage\n")
    with pytest.raises(AuditError, match="does not parse"):
        AuditLog(path).append("round-started", round=2)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"key": b"\x00" * 32}, "bytes: never log key material"),
        ({"nested": {"deep": [1, bytearray(b"x")]}}, r"'nested\.deep\[1\]' is bytearray"),
        ({"blob": memoryview(b"abc")}, "memoryview"),
        ({"reason": "x" * 4097}, "longer than 4096 bytes"),
        ({"reason": "é" * 2049}, "longer than 4096 bytes"),  # counted in UTF-8 bytes
        ({"loss": float("nan")}, "not a finite number"),
        ({"obj": object()}, "is not JSON"),
        ({"seq": 3}, "reserved"),
        ({"hash": "0"}, "reserved"),
        ({"mapping": {1: "a"}}, "not a string"),
    ],
)
def test_refused_fields(tmp_path: Path, fields: dict[str, object], match: str) -> None:
    path = tmp_path / "audit.jsonl"
    with pytest.raises(AuditError, match=match):
        AuditLog(path).append(EVENT_SITE_SEEN, **fields)
    assert not path.exists() or path.read_bytes() == b""


def test_long_but_allowed_string_and_bad_event_name(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.append(EVENT_REPLY_REJECTED, reason="x" * 4096)["reason"] == "x" * 4096
    for event in ("", "Site Seen", "site_seen", "-x"):
        with pytest.raises(AuditError, match="kebab-case"):
            log.append(event)
    assert verify_chain(log.path) == []


def test_missing_log_is_an_audit_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot read the audit log"):
        verify_chain(tmp_path / "audit.jsonl")
    assert AuditLog(tmp_path / "audit.jsonl").repair() is None


def test_clip_text_fits_the_limit(tmp_path: Path) -> None:
    assert clip_text("short") == "short"
    for text in ("x" * 10_000, "é" * 5000, "€" * 3000):
        clipped = clip_text(text)
        assert len(clipped.encode()) <= 4096 and clipped.endswith("bytes in all)")
        AuditLog(tmp_path / "audit.jsonl").append(EVENT_REPLY_REJECTED, reason=clipped)
