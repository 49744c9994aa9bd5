"""Module scopes and the flat ``<module>/<key>`` state: who holds, sends and aggregates what."""

from __future__ import annotations

import pytest
import torch

from common.config import ModuleConfig
from common.errors import UpdateRejected
from common.modules import (
    join_modules,
    module_members,
    sent_modules,
    site_groups,
    site_modules,
    split_modules,
)

MODULES = {
    "shared": ModuleConfig(rank=8, site_ranks={"site-2": 2}),
    "style": ModuleConfig(scope="private"),
    "qa": ModuleConfig(scope="group:qa"),
    "creative": ModuleConfig(scope="group:creative"),
}
GROUPS = {"qa": ["site-0", "site-1"], "creative": ["site-2"]}


def test_a_site_holds_shared_its_groups_and_private_modules() -> None:
    assert list(site_modules(MODULES, GROUPS, "site-0")) == ["qa", "shared", "style"]
    assert list(site_modules(MODULES, GROUPS, "site-2")) == ["creative", "shared", "style"]
    assert list(site_modules(MODULES, GROUPS, "elsewhere")) == ["shared", "style"]
    assert sent_modules(MODULES, GROUPS, "site-1") == ["qa", "shared"]
    assert site_groups(GROUPS, "site-2") == ["creative"]


def test_per_site_rank_applies_to_that_site_only() -> None:
    assert site_modules(MODULES, GROUPS, "site-2")["shared"].rank == 2
    assert site_modules(MODULES, GROUPS, "site-0")["shared"].rank == 8
    assert site_modules(MODULES, GROUPS, "site-2")["shared"].site_ranks == {}


def test_members_of_each_scope() -> None:
    sites = ["site-0", "site-1", "site-2"]
    assert module_members(MODULES["shared"], GROUPS, sites) == sites
    assert module_members(MODULES["qa"], GROUPS, sites) == ["site-0", "site-1"]
    assert module_members(MODULES["style"], GROUPS, sites) == []


def test_flat_state_round_trips_and_rejects_keys_without_a_module() -> None:
    states = {"shared": {"a.lora_A.weight": torch.ones(2)}, "qa": {"b": torch.zeros(1)}}
    flat = join_modules(states)
    assert sorted(flat) == ["qa/b", "shared/a.lora_A.weight"]
    assert split_modules(flat) == states
    for bad in ("no-module-key", "/x", "Shared/x", "shared/"):
        with pytest.raises(UpdateRejected, match="names no module"):
            split_modules({bad: torch.ones(1)})
