"""Read a data file into text or rows, with errors that name the file and the line.

``common.data`` turns the rows into examples; this module knows only file formats: UTF-8 text,
JSON lines (or one JSON array of objects) and CSV with a header row. Parquet files, folders and
hub data sets go through ``datasets`` (``common.tables``); these three formats stay here because
this reader names the line of every problem and keeps CSV values as the strings they are.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Any

from common.errors import DataError

# Longest line accepted in any data file (bytes); longer ones are almost always a wrong file.
MAX_LINE_BYTES = 1_000_000

# (where, row): where = "path, line N" (or "path, record N" in a JSON array), for messages.
Record = tuple[str, dict[str, Any]]


def read_text(path: Path) -> str:
    """The whole file decoded as UTF-8; a DataError for a missing, empty or malformed file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a .jsonl, .json, .csv or .txt file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; expected at least one example")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if len(line) > MAX_LINE_BYTES:
            raise DataError(
                f"{path}, line {number}: the line is {len(line):,} bytes long; "
                f"expected lines of at most {MAX_LINE_BYTES:,} bytes"
            )
    # A byte-order mark (spreadsheet exports) would otherwise stick to the first column name.
    body = raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = body[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {number}: byte {exc.start} is not valid UTF-8; expected UTF-8 text"
        ) from None


def json_records(path: Path, text: str) -> list[Record]:
    """Rows of a JSON-lines file, or of a file holding one JSON array of objects."""
    located: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # 4300+ digit integers, deep nesting
            raise DataError(f"{path}, line 1: unreadable JSON ({type(exc).__name__})") from None
        located = [(f"{path}, record {i}", item) for i, item in enumerate(items, start=1)]
    else:
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line breaks.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}, line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}, line {number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                    "expected one JSON object per line"
                ) from None
            except (ValueError, RecursionError) as exc:  # 4300+ digit integers, deep nesting
                raise DataError(
                    f"{path}, line {number}: unreadable JSON ({type(exc).__name__}); "
                    "expected one flat JSON object per line"
                ) from None
    for where, item in located:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return located


def csv_records(path: Path, text: str) -> list[Record]:
    """Rows of a CSV file with a header row (quoted fields may hold commas and newlines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
        if len(set(header)) != len(header):
            raise DataError(f"{path}, line 1: repeated column names in the header {header}")
        records: list[Record] = []
        for row in reader:
            if not row:
                continue
            where = f"{path}, line {reader.line_num}"
            if len(row) != len(header):
                raise DataError(
                    f"{where}: {len(row)} fields; expected {len(header)} as in the header "
                    f"({', '.join(header)})"
                )
            records.append((where, dict(zip(header, row, strict=True))))
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None
    return records


def read_records(path: Path, text: str, explicit_format: bool) -> list[Record]:
    """Rows of a .jsonl, .json or .csv file; other suffixes only with an explicit format."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return json_records(path, text)
    if suffix == ".csv":
        return csv_records(path, text)
    if not explicit_format:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {suffix!r}; expected .jsonl, "
            ".json, .csv, .txt or .parquet, or set data.format"
        )
    # An explicit format with an unusual suffix: JSON if it looks like JSON, else CSV.
    if text.lstrip()[:1] in ("{", "["):
        return json_records(path, text)
    return csv_records(path, text)
