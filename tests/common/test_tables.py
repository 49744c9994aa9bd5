"""Data through ``datasets`` (common.tables): a parquet file, a save_to_disk folder, a folder of
data files and a hub data set in a cache laid out as huggingface_hub does it give the same
examples, and the same partition, as the JSONL form of the same rows; errors name the source,
the row, the column or the split."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets
import pytest

from common.config import DataConfig, config_from_dict
from common.data import load_dataset
from common.errors import DataError
from common.partition import partition, site_data

ROWS = [
    {"text": f"message {i}", "label": ["card", "loan", "atm"][i % 3], "branch": f"b{i % 4}"}
    for i in range(60)
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _cfg(path: Path | str, **kwargs: Any) -> DataConfig:
    return DataConfig(path=Path(path), **kwargs)


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """The same 60 rows as JSONL, parquet, a save_to_disk folder and a folder of files."""
    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    _jsonl(tmp_path / "files" / "train.jsonl", ROWS)
    _jsonl(tmp_path / "files" / "test.jsonl", ROWS[:6])
    return {
        "jsonl": _jsonl(tmp_path / "rows.jsonl", ROWS),
        "parquet": tmp_path / "rows.parquet",
        "save_to_disk": tmp_path / "saved",
        "folder": tmp_path / "files",
    }


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "folder"])
@pytest.mark.parametrize(
    "split", [{"partition": "iid"}, {"partition": "dirichlet", "alpha": 0.3, "by": "branch"}]
)
def test_same_rows_give_the_same_examples_and_partition(
    sources: dict[str, Path], kind: str, split: dict[str, Any]
) -> None:
    reference = load_dataset(_cfg(sources["jsonl"], by="branch"))
    loaded = load_dataset(_cfg(sources[kind], by="branch"))
    assert loaded.examples == reference.examples
    assert loaded.label_names == reference.label_names == ["atm", "card", "loan"]
    cfg = _cfg(sources[kind], seed=3, **split)
    assert partition(loaded, 3, cfg) == partition(reference, 3, cfg)
    assert site_data(loaded, 1, 3, cfg) == site_data(reference, 1, 3, cfg)


def test_folder_splits_follow_the_file_names(sources: dict[str, Path]) -> None:
    folder = sources["folder"]
    assert len(load_dataset(_cfg(folder)).examples) == 60  # data.split = "train"
    cfg = DataConfig(path=folder, eval_path=folder)
    assert len(load_dataset(cfg, folder, split="test").examples) == 6
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: test, train\); set data\.split"):
        load_dataset(_cfg(folder, split="dev"))


def test_eval_path_reads_data_eval_split(sources: dict[str, Path], tmp_path: Path) -> None:
    cfg = DataConfig(path=sources["jsonl"], eval_path=sources["folder"])
    assert len(load_dataset(cfg, cfg.eval_path).examples) == 6  # data.eval-split = "test"
    with pytest.raises(DataError, match=r"set data\.eval-split"):
        load_dataset(cfg.model_copy(update={"eval_split": "dev"}), cfg.eval_path)


def test_class_label_columns_give_their_names(tmp_path: Path, sources: dict[str, Path]) -> None:
    table = datasets.Dataset.from_list(ROWS).class_encode_column("label")
    table.save_to_disk(str(tmp_path / "encoded"))
    loaded = load_dataset(_cfg(tmp_path / "encoded"))
    assert loaded.examples == load_dataset(_cfg(sources["jsonl"])).examples


def test_row_errors_name_the_source_row_and_column(tmp_path: Path) -> None:
    rows = [dict(row) for row in ROWS[:5]]
    rows[3]["text"] = "   "
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "blank.parquet"))
    with pytest.raises(DataError) as info:
        load_dataset(_cfg(tmp_path / "blank.parquet"))
    assert f"{tmp_path / 'blank.parquet'}, row 4: column 'text' is empty" in str(info.value)
    datasets.Dataset.from_list([{"body": "x", "label": "a"}]).to_parquet(
        str(tmp_path / "cols.parquet")
    )
    with pytest.raises(DataError, match=r"cols\.parquet, row 1: cannot tell the format"):
        load_dataset(_cfg(tmp_path / "cols.parquet"))
    with pytest.raises(DataError, match=r"cols\.parquet, row 1: missing column 'text'"):
        load_dataset(_cfg(tmp_path / "cols.parquet", format="classification"))


def test_a_broken_parquet_file_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: datasets cannot read it"):
        load_dataset(_cfg(tmp_path / "broken.parquet"))


def _hub_dataset_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """``datasets--org--name`` as huggingface_hub writes it (blobs, refs/main, snapshot)."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for number, (name, source) in enumerate(sorted(files.items())):
        blob = repo / "blobs" / f"blob{number}"
        shutil.copyfile(source, blob)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_hub_data_set_from_the_cache_offline(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {"data/train-00000-of-00001.parquet": sources["parquet"]}
    _hub_dataset_cache(cache, "bank/intents", files)
    # A hub name passes the config's file checks (it is no path) and loads from the cache.
    cfg = config_from_dict(
        {"model": {"name": "tiny-llama"}, "data": {"path": "bank/intents", "by": "branch"}}
    ).data
    assert str(cfg.path) == "bank/intents"
    loaded = load_dataset(cfg)
    reference = load_dataset(_cfg(sources["jsonl"], by="branch"))
    assert loaded.examples == reference.examples
    assert partition(loaded, 3, cfg) == partition(reference, 3, cfg)


def test_missing_hub_data_set_offline_names_it_the_cache_and_how_to_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(DataError) as info:
        load_dataset(_cfg("nobody/nothing"))
    message = str(info.value)
    assert "data.path = 'nobody/nothing'" in message
    assert f"not in the Hugging Face cache {tmp_path / 'hub'}" in message
    assert "hf download nobody/nothing --repo-type dataset" in message
    assert "\n" not in message


def test_local_sources_leave_no_datasets_cache(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    for kind in ("parquet", "save_to_disk", "folder"):
        load_dataset(_cfg(sources[kind]))
    assert list((tmp_path / "tmp").iterdir()) == []
    assert sorted(p.name for p in sources["folder"].iterdir()) == ["test.jsonl", "train.jsonl"]
