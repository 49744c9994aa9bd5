"""``federation.init-from``: start a new run from published adapter versions.

``init-from = "PATH"`` starts every sent module of the run from the latest version of the module
of the same name in the registry at PATH (a run folder or its ``registry/``);
``"PATH:MODULE"`` or ``"PATH:MODULE:VERSION"`` starts only that module, from that version (the
others start from their seeded initialisation). Version 0 of the new run is then bit-identical
to the source version, and its manifest's ``init_from`` records where it came from (registry,
module, version, SHA-256, base fingerprint, run id).

Everything is checked before the run starts, each failure one ``ConfigError`` naming
``federation.init-from``: the path holds a registry, the module and version exist, the tensors
match their manifest's SHA-256, the module's rank, alpha and targets are the run's, the source
was trained on this run's base (same fingerprint), and its tensors have the run's keys and
shapes. Carrying an adapter to a different base (``federation.rebase``) is not implemented.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.adapters import AdapterState
from common.config import ModuleConfig, RunConfig
from common.errors import ConfigError, RegistryError
from common.registry import Registry, find_registry
from common.registry_format import ADAPTER_FILE, CONFIG_FILE
from common.scopes import MODULE_NAME, PRIVATE

KEY = "federation.init-from"
_VERSION = re.compile(r"v?(\d+)|latest")


@dataclass(frozen=True)
class InitSource:
    """One module's starting point: a verified registry version's tensors and its lineage."""

    module: str
    version: int
    state: AdapterState
    base_fingerprint: str | None
    lineage: dict[str, Any]


def parse_init_from(text: str) -> tuple[Path, str | None, int | None]:
    """``PATH[:MODULE[:VERSION]]`` -> (path, module or None, version or None for the latest).

    A path that exists as a folder is taken whole, colons and all.
    """
    if Path(text).is_dir() or ":" not in text:
        return Path(text), None, None
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ConfigError(f"{KEY} = {text!r}: expected PATH, PATH:MODULE or PATH:MODULE:VERSION")
    module = parts[1]
    if not MODULE_NAME.fullmatch(module):
        raise ConfigError(f"{KEY} = {text!r}: {module!r} is not a module name")
    version: int | None = None
    if len(parts) == 3:
        match = _VERSION.fullmatch(parts[2])
        if match is None:
            raise ConfigError(
                f"{KEY} = {text!r}: version {parts[2]!r}: expected a number (3 or v0003) or "
                "'latest'"
            )
        version = int(match[1]) if match[1] is not None else None
    return Path(parts[0]), module, version


def _check_module_config(
    text: str, name: str, run: ModuleConfig, adapter_config: dict[str, Any]
) -> None:
    """The source's rank, alpha and targets must be the run's: the same tensors under another
    alpha (scaling) or rank would be a different adapter."""
    source = (
        adapter_config.get("r"),
        adapter_config.get("lora_alpha"),
        sorted(adapter_config.get("target_modules") or []),
    )
    wanted = (run.rank, run.alpha, sorted(run.targets))
    if source != wanted:
        raise ConfigError(
            f"{KEY} = {text!r}: {name} has rank, alpha, targets {source}; the run's module "
            f"{name.split('/')[0]!r} has {wanted}"
        )


def _source(
    text: str, registry: Registry, module: str, version: int | None, run: ModuleConfig
) -> InitSource:
    try:
        entry = registry.get(module, version)
        state = registry.load(module, entry.version)  # checks the SHA-256 against the manifest
        manifest = entry.manifest
        adapter_config = json.loads((entry.path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (RegistryError, OSError, ValueError) as exc:
        raise ConfigError(f"{KEY} = {text!r}: {exc}") from None
    _check_module_config(text, entry.name, run, adapter_config)
    recorded = manifest.get("base_fingerprint")
    lineage = {
        "registry": str(registry.root.resolve()),
        "module": module,
        "version": entry.version,
        "sha256": manifest.get("sha256", {}).get(ADAPTER_FILE),
        "base_fingerprint": recorded,
        "run_id": manifest.get("run_id"),
    }
    return InitSource(
        module=module,
        version=entry.version,
        state={k: v.float() for k, v in state.items()},  # fp32 as published; exact from fp16
        base_fingerprint=recorded if isinstance(recorded, str) else None,
        lineage=lineage,
    )


def read_init_sources(cfg: RunConfig) -> dict[str, InitSource]:
    """The run's ``init-from`` sources by module, read and verified; {} without one."""
    text = cfg.federation.init_from
    if text is None:
        return {}
    path, module, version = parse_init_from(text)
    try:
        registry = find_registry(path)
    except RegistryError as exc:
        raise ConfigError(f"{KEY} = {text!r}: {exc}") from None
    sent = {name: m for name, m in cfg.modules.items() if m.scope != PRIVATE}
    if module is not None and module not in sent:
        raise ConfigError(
            f"{KEY} = {text!r}: the run has no sent module {module!r} (modules: {sorted(sent)})"
        )
    wanted = [module] if module is not None else sorted(sent)
    missing = [name for name in wanted if name not in registry.modules()]
    if missing:
        raise ConfigError(
            f"{KEY} = {text!r}: {registry.root} has no module {missing} (modules: "
            f"{registry.modules()}); name one with PATH:MODULE[:VERSION]"
        )
    return {name: _source(text, registry, name, version, sent[name]) for name in wanted}


def check_init_sources(
    sources: Mapping[str, InitSource], fingerprint: str, initial: Mapping[str, AdapterState]
) -> None:
    """Each source fits this run: trained on its base, with its modules' keys and shapes."""
    for name, source in sources.items():
        where = f"{KEY}: {name}/v{source.version:04d}"
        if source.base_fingerprint != fingerprint:
            raise ConfigError(
                f"{where} was trained on base {source.base_fingerprint}, this run's base is "
                f"{fingerprint}; starting on another base (federation.rebase) is not supported"
            )
        expected = {k: tuple(v.shape) for k, v in initial[name].items()}
        found = {k: tuple(v.shape) for k, v in source.state.items()}
        if expected != found:
            differ = sorted(set(expected) ^ set(found)) or [
                k for k in sorted(expected) if expected[k] != found[k]
            ]
            raise ConfigError(f"{where}: its tensors do not fit the run's module: {differ[:3]}")
