"""A site's store: kept tensors by version (what a redone round starts from), its registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from client.kept_states import KEEP_LAST
from client.site_store import SiteStore
from common.errors import UpdateRejected


@pytest.mark.parametrize("on_disk", [True, False])
def test_kept_state_is_read_from_the_newest_earlier_version(tmp_path: Path, on_disk: bool) -> None:
    store = SiteStore(tmp_path / "site" if on_disk else None)
    assert store.load_kept(before=0) == {}
    for version in range(6):
        store.save_kept(version, {"style/x": torch.full((2,), float(version))})
    # Training on (or evaluating) version 4 starts from what training on version 3 kept.
    assert torch.equal(store.load_kept(before=4)["style/x"], torch.full((2,), 3.0))
    # A redone round replaces its own file; rounds after it read the new one.
    store.save_kept(5, {"style/x": torch.full((2,), 50.0)})
    assert torch.equal(store.load_kept(before=6)["style/x"], torch.full((2,), 50.0))
    assert store.load_kept(before=1) == {}  # pruned: only the newest KEEP_LAST remain
    if on_disk:
        assert len(list((tmp_path / "site" / "kept").iterdir())) == KEEP_LAST


def test_registry_records_each_version_once_with_its_number(tmp_path: Path) -> None:
    store = SiteStore(tmp_path)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    state = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.zeros(3, 2)}
    for version in (0, 2, 2):  # a site that missed version 1 and saw version 2 twice
        store.record(version, {"style": state}, {"style": lora}, {"site": "a"}, {"style": "x"})
    assert store.registry is not None
    assert [v.version for v in store.registry.versions("style")] == [0, 2]
    assert store.registry.get("style", 2).manifest["parent"] == 1
    assert store.registry.verify() == ["style/v0001: missing (gap in the lineage)"]
    SiteStore(None).record(0, {"style": state}, {"style": lora}, {}, {"style": "x"})  # no-op


def test_runs_never_share_kept_tensors_or_versions(tmp_path: Path) -> None:
    store = SiteStore(tmp_path)
    first, second = store.for_run("a" * 32), store.for_run("b" * 32)
    first.save_kept(0, {"style/x": torch.ones(1)})
    assert second.load_kept(before=1) == {}  # another run starts from its own initialisation
    assert store.for_run("a" * 32).load_kept(before=1)["style/x"].item() == 1.0
    assert first.root == tmp_path / ("a" * 32)
    for hostile in ("../escape", "", "a/b", "x" * 65):
        with pytest.raises(UpdateRejected, match="not a plain name"):
            store.for_run(hostile)
