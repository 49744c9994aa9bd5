"""Adapter modules: which modules a site holds and sends, and one flat state for all of them.

Each module has a scope (``common.scopes``): ``shared``, ``group:<name>`` or ``private``.
Between the coordinator, the ClientApp and a site, the tensors of several modules travel as one
flat ``AdapterState`` whose keys are ``<module>/<peft key>`` (module names never contain
``/``): the Flower ``ArrayRecord``, the site worker's frames and the delta all keep their
one-state shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from common.errors import UpdateRejected
from common.scopes import MODULE_NAME, PRIVATE, module_group

if TYPE_CHECKING:
    # Type names only: the CLI checks a config before anything loads torch (about 1 s of the
    # 2-core budget), and common.adapters imports torch.
    import torch

    from common.adapters import AdapterState
    from common.config import ModuleConfig

SEPARATOR = "/"


def site_groups(groups: Mapping[str, list[str]], site_id: str) -> list[str]:
    """The groups ``site_id`` belongs to, sorted."""
    return sorted(name for name, members in groups.items() if site_id in members)


def site_modules(
    modules: Mapping[str, ModuleConfig], groups: Mapping[str, list[str]], site_id: str
) -> dict[str, ModuleConfig]:
    """The modules one site trains, with its own rank: shared, its groups', private; sorted."""
    mine = set(site_groups(groups, site_id))
    held: dict[str, ModuleConfig] = {}
    for name in sorted(modules):
        module = modules[name]
        group = module_group(module.scope)
        if group is None or group in mine:
            held[name] = module.for_site(site_id)
    return held


def sent_modules(
    modules: Mapping[str, ModuleConfig], groups: Mapping[str, list[str]], site_id: str
) -> list[str]:
    """The modules whose deltas ``site_id`` sends each round (its non-private ones), sorted."""
    held = site_modules(modules, groups, site_id)
    return [name for name, module in held.items() if module.scope != PRIVATE]


def module_members(
    module: ModuleConfig, groups: Mapping[str, list[str]], sites: list[str]
) -> list[str]:
    """Which of ``sites`` a module aggregates over (none for a private module)."""
    if module.scope == PRIVATE:
        return []
    group = module_group(module.scope)
    return list(sites) if group is None else [s for s in sites if s in groups.get(group, [])]


def join_modules(states: Mapping[str, Mapping[str, torch.Tensor]]) -> AdapterState:
    """One flat state ``<module>/<key>`` from per-module states."""
    return {
        f"{module}{SEPARATOR}{key}": tensor
        for module, state in states.items()
        for key, tensor in state.items()
    }


def split_modules(flat: Mapping[str, torch.Tensor]) -> dict[str, AdapterState]:
    """Per-module states from a flat ``<module>/<key>`` state.

    Raises
    ------
    UpdateRejected
        For a key without a valid module name before the first ``/``.
    """
    from common.adapters import _quote  # imports torch: see the imports above

    out: dict[str, AdapterState] = {}
    for key, tensor in flat.items():
        module, sep, rest = key.partition(SEPARATOR)
        if not sep or not rest or not MODULE_NAME.fullmatch(module):
            raise UpdateRejected(f"tensor {_quote(key)} names no module (<module>/<key>)")
        out.setdefault(module, {})[rest] = tensor
    return out
