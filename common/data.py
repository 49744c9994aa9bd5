"""Examples from one data source: what a site trains and evaluates on, and the coordinator's
global evaluation set. Splitting them among simulated sites is ``common.partition``.

Three kinds of data, one ``Example`` type:

- ``instruction``: JSONL/JSON/CSV rows with an instruction, an optional context and a response
  (databricks-dolly-15k, Alpaca-style files);
- ``classification``: JSONL/JSON/CSV rows with a text and a label (banking77);
- ``text``: a plain ``.txt`` file cut into chunks of whole paragraphs (tinyshakespeare).

Instruction and classification rows may also come from a parquet file, a folder of data files
or a ``save_to_disk`` folder, or a Hugging Face data set name (``common.tables``, through
``datasets``; the split is ``data.split``, or ``data.eval-split`` for ``data.eval-path``).

Every problem with a file is a ``DataError`` naming the file, the line (or row) and what was
expected. Token tensors and batches are made in ``common.tokens``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.config import DataConfig
from common.errors import DataError
from common.records import Record, read_records, read_text
from common.tables import is_table_source, table_records

log = logging.getLogger(__name__)

Kind = Literal["instruction", "classification", "text"]


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    ``text`` is the input text (classification), one chunk (text) or the instruction, followed
    by a blank line and the context when there is one (instruction). ``group`` is the value of
    the ``data.by`` column, or the label name of a classification example; partitioning uses it.
    """

    text: str
    response: str | None = None
    label: int | None = None
    group: str | None = None


@dataclass(frozen=True)
class Dataset:
    """The examples of one file, their kind and, for classification, the label names by id."""

    examples: list[Example]
    kind: Kind
    label_names: list[str] | None
    source: Path


@dataclass(frozen=True)
class SiteData:
    """One site's examples: those it trains on and those it keeps back for local evaluation."""

    train: list[Example]
    heldout: list[Example]


# --------------------------------------------------------------------------- rows to examples


def _column(where: str, row: dict[str, Any], column: str, key: str) -> Any:
    if column not in row:
        found = ", ".join(repr(name) for name in row)
        raise DataError(
            f"{where}: missing column {column!r} (columns found: {found}); "
            f"set {key} to the column that holds it"
        )
    return row[column]


def _string(where: str, row: dict[str, Any], column: str, key: str) -> str:
    """A non-empty text column."""
    value = _column(where, row, column, key)
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be a string, got {value!r}")
    if not value.strip():
        raise DataError(f"{where}: column {column!r} is empty; expected non-empty text")
    return value


def _name(where: str, row: dict[str, Any], column: str, key: str) -> str:
    """A label or group value: a non-empty string or an integer, as a string."""
    value = _column(where, row, column, key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: column {column!r} must be a string or integer, got {value!r}")
    name = str(value).strip()
    if not name:
        raise DataError(f"{where}: column {column!r} is empty; expected a label")
    return name


def _group(where: str, row: dict[str, Any], cfg: DataConfig) -> str | None:
    return None if cfg.by is None else _name(where, row, cfg.by, "data.by")


def _instruction_example(where: str, row: dict[str, Any], cfg: DataConfig) -> Example:
    text = _string(where, row, cfg.instruction_column, "data.instruction-column")
    context = row.get(cfg.context_column)
    if context is not None and not isinstance(context, str):
        raise DataError(f"{where}: column {cfg.context_column!r} must be a string")
    if context and context.strip():
        text = f"{text}\n\n{context}"
    response = _string(where, row, cfg.response_column, "data.response-column")
    return Example(text=text, response=response, group=_group(where, row, cfg))


def sort_label_names(names: set[str]) -> list[str]:
    """Label names in id order: numerically when all are integers (so "10" follows "9")."""
    if all(re.fullmatch(r"-?\d+", name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _label_ids(path: Path, found: set[str], label_names: list[str] | None) -> list[str]:
    names = sort_label_names(found) if label_names is None else [str(n) for n in label_names]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: the given label names repeat a name: {names}")
    if len(names) < 2:
        raise DataError(
            f"{path}: classification needs at least 2 distinct labels, found {names}; "
            "check data.label-column"
        )
    return names


def _classification_dataset(
    path: Path, records: list[Record], cfg: DataConfig, label_names: list[str] | None
) -> Dataset:
    rows = []
    for where, row in records:
        text = _string(where, row, cfg.text_column, "data.text-column")
        label = _name(where, row, cfg.label_column, "data.label-column")
        rows.append((where, text, label, _group(where, row, cfg)))
    names = _label_ids(path, {label for _, _, label, _ in rows}, label_names)
    ids = {name: i for i, name in enumerate(names)}
    examples = []
    for where, text, label, group in rows:
        if label not in ids:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise DataError(
                f"{where}: label {label!r} is not one of the {len(names)} known labels ({shown})"
            )
        examples.append(
            Example(text=text, label=ids[label], group=label if group is None else group)
        )
    return Dataset(examples, "classification", names, path)


def _detect_kind(where: str, row: dict[str, Any], cfg: DataConfig) -> Kind:
    if cfg.instruction_column in row and cfg.response_column in row:
        return "instruction"
    if cfg.text_column in row and cfg.label_column in row:
        return "classification"
    found = ", ".join(repr(name) for name in row)
    raise DataError(
        f"{where}: cannot tell the format from the columns ({found}); expected "
        f"{cfg.instruction_column!r} and {cfg.response_column!r} (instruction data) or "
        f"{cfg.text_column!r} and {cfg.label_column!r} (classification); set data.format "
        "and the data.*-column keys"
    )


# --------------------------------------------------------------------------- plain text


def _pack(parts: list[str], separator: str, limit: int) -> list[str]:
    """Join consecutive parts with ``separator`` into pieces of at most ``limit`` characters."""
    pieces: list[str] = []
    current = ""
    for part in parts:
        candidate = f"{current}{separator}{part}" if current else part
        if len(candidate) <= limit or not current:
            current = candidate
        else:
            pieces.append(current)
            current = part
    if current:
        pieces.append(current)
    return pieces


def _split_line(line: str, limit: int) -> list[str]:
    """Cut one overlong line into pieces of at most ``limit`` characters, at spaces if any."""
    pieces = []
    while len(line) > limit:
        cut = line.rfind(" ", 1, limit + 1)
        cut = cut if cut > 0 else limit
        pieces.append(line[:cut])
        line = line[cut:].lstrip(" ")
    pieces.append(line)
    return pieces


def text_chunks(text: str, chunk_chars: int) -> list[str]:
    """Cut text into chunks of about ``chunk_chars`` characters at paragraph or line ends.

    Whole paragraphs (separated by blank lines) are packed together; a paragraph longer than
    a chunk is cut at line ends, and a line longer than a chunk at spaces (or anywhere if it
    has none).
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    paragraphs: list[str] = []
    for paragraph in re.split(r"\n[ \t\r]*\n", text):
        paragraph = paragraph.strip("\r\n")
        if not paragraph.strip():
            continue
        if len(paragraph) <= chunk_chars:
            paragraphs.append(paragraph)
            continue
        lines: list[str] = []
        for line in paragraph.split("\n"):
            lines.extend(_split_line(line, chunk_chars))
        paragraphs.extend(_pack(lines, "\n", chunk_chars))
    return _pack(paragraphs, "\n\n", chunk_chars)


# --------------------------------------------------------------------------- load_dataset


def load_dataset(
    cfg: DataConfig,
    path: Path | None = None,
    label_names: list[str] | None = None,
    text_chunk_chars: int = 512,
    split: str | None = None,
) -> Dataset:
    """Read one data source (``cfg.path`` unless ``path`` is given) into a ``Dataset``.

    ``label_names`` fixes the classification label ids (pass the training set's names when
    loading an evaluation file or a site's own file, so that ids agree everywhere); by default
    they are the sorted distinct labels of the whole file. ``split`` picks the split of a
    folder or hub data set; by default ``cfg.split``, or ``cfg.eval_split`` when ``path`` is
    ``cfg.eval_path`` (and not ``cfg.path`` too).
    """
    path = path if path is not None else cfg.path
    if path is None:
        raise DataError("no data file: set data.path to the examples (JSONL, CSV or .txt)")
    path = Path(path)
    evaluation = path == cfg.eval_path and path != cfg.path
    if split is None:
        split = cfg.eval_split if evaluation else cfg.split
    if is_table_source(path):
        if cfg.format == "text":
            raise DataError(f"{path}: data.format = 'text' needs a .txt file")
        key = "data.eval-split" if evaluation else "data.split"
        dataset = _rows_dataset(path, table_records(path, split, key), cfg, label_names)
    elif cfg.format == "text" or (cfg.format == "auto" and path.suffix.lower() == ".txt"):
        chunks = text_chunks(read_text(path), text_chunk_chars)
        dataset = Dataset([Example(text=chunk) for chunk in chunks], "text", None, path)
    else:
        records = read_records(path, read_text(path), explicit_format=cfg.format != "auto")
        dataset = _rows_dataset(path, records, cfg, label_names)
    if not dataset.examples:
        raise DataError(f"{path}: no examples found; expected at least one")
    log.info("loaded %d %s examples from %s", len(dataset.examples), dataset.kind, path)
    return dataset


def _rows_dataset(
    path: Path, records: list[Record], cfg: DataConfig, label_names: list[str] | None
) -> Dataset:
    """Instruction or classification examples from located rows."""
    if not records:
        raise DataError(f"{path}: no examples found; expected at least one row after the header")
    kind = _detect_kind(*records[0], cfg) if cfg.format == "auto" else cfg.format
    if kind == "classification":
        return _classification_dataset(path, records, cfg, label_names)
    examples = [_instruction_example(where, row, cfg) for where, row in records]
    return Dataset(examples, "instruction", None, path)
