"""Rows of the data sources ``datasets`` reads: a parquet file, a folder, a hub data set name.

``common.records`` reads single JSONL/JSON/CSV/text files itself: it reports the file line of
every problem, keeps every CSV value a string (pandas, behind ``datasets``' CSV builder, turns
a text column of digits into integers and an empty cell into NaN) and refuses bad UTF-8 at
its byte. Everything else goes through ``datasets``:

- a ``.parquet`` file: ``load_dataset("parquet", data_files=...)``;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``:
  ``load_from_disk``;
- any other folder: ``load_dataset(folder)``, which reads the data files in it (parquet, JSON
  lines, CSV, arrow) and names splits after the files (``train.jsonl``, ``test-*.parquet``,
  ``data/train/...``), as a hub data set repository is laid out;
- a hub data set name (``org/name``): its snapshot in the local hub cache
  (``datasets--org--name``), else ``load_dataset(name)``, which uses the ``datasets`` cache
  when offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) and downloads otherwise.

Local sources are read into memory with a temporary ``datasets`` cache that is removed
afterwards: a run leaves no arrow cache behind. Rows are located as ``"<source>, row N"``
(1-based, within the split) for the messages of ``common.data``; class-label columns give
their label names.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.model_names import hub_cache, hub_offline, looks_like_dataset_name
from common.records import Record

_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_table_source(path: Path) -> bool:
    """Whether ``datasets`` reads ``path``: a parquet file, a folder or a hub data set name."""
    if path.is_dir():
        return True
    if path.suffix.lower() == ".parquet":
        return True
    return not path.exists() and looks_like_dataset_name(str(path))


def _offline() -> bool:
    return hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in _TRUE


def table_records(source: Path, split: str, split_key: str = "data.split") -> list[Record]:
    """The rows of one split of ``source`` (a parquet file, a folder or a hub name).

    Raises
    ------
    DataError
        When ``source`` cannot be read, has no split ``split`` (the message names
        ``split_key`` and the splits it has), or is a hub name not in the local caches.
    """
    import datasets

    with tempfile.TemporaryDirectory(prefix="fedlora-datasets-") as scratch:
        loaded = _load(source, scratch)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{source}: no split {split!r} (splits: {', '.join(sorted(loaded))}); "
                    f"set {split_key} to one of them"
                )
            table = loaded[split]
        else:
            table = loaded
        if not isinstance(table, datasets.Dataset):
            raise DataError(f"{source}: expected a table of rows, got {type(table).__name__}")
        return _rows(source, table)


def _load(source: Path, scratch: str) -> Any:
    """What ``datasets`` makes of ``source``: a ``Dataset`` or a ``DatasetDict``."""
    import datasets
    from datasets.exceptions import DatasetsError

    memory = {"cache_dir": scratch, "keep_in_memory": True}
    try:
        if source.is_file():
            return datasets.load_dataset("parquet", data_files=str(source), **memory)
        if source.is_dir() and any((source / m).is_file() for m in _SAVED_MARKERS):
            return datasets.load_from_disk(str(source), keep_in_memory=True)
        if source.is_dir():
            return datasets.load_dataset(str(source), **memory)
        return _load_hub(str(source), scratch)
    except DataError:
        raise
    except (DatasetsError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"{source}: datasets cannot read it: {_first_line(exc)}") from None


def _load_hub(name: str, scratch: str) -> Any:
    """A hub data set: its cached snapshot, else ``datasets``' own cache (or a download)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        folder = snapshot_download(
            name, repo_type="dataset", cache_dir=cache, local_files_only=_offline()
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        folder = None
    if folder is not None:
        return datasets.load_dataset(str(folder), cache_dir=scratch, keep_in_memory=True)
    try:
        return datasets.load_dataset(name)
    except (DatasetNotFoundError, ConnectionError, OSError, ValueError) as exc:
        where = "offline, and " if _offline() else ""
        raise DataError(
            f"data.path = {name!r}: no such file or folder; as a hub data set, {where}not in "
            f"the Hugging Face cache {cache} or the datasets cache ({_first_line(exc)}); fetch "
            f"it with `hf download {name} --repo-type dataset` on a connected machine and "
            f"copy {cache} here"
        ) from None


def _rows(source: Path, table: Any) -> list[Record]:
    """``(where, row)`` pairs; class-label columns map their integer ids to label names."""
    import datasets

    labels = {
        column: feature
        for column, feature in table.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    records: list[Record] = []
    for number, row in enumerate(table, start=1):
        for column, feature in labels.items():
            if isinstance(row.get(column), int) and 0 <= row[column] < feature.num_classes:
                row[column] = feature.int2str(row[column])
        records.append((f"{source}, row {number}", row))
    return records


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if cause is not None and str(cause):
        text += f" ({str(cause).splitlines()[0]})"
    return text
