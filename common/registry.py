"""The adapter registry: every global adapter version of each module, in one folder.

``<root>/<module>/v<NNNN>/`` is one version in the format of ``common.registry_format`` (a PEFT
folder, a manifest with the SHA-256 of its files, a model card), published atomically and never
overwritten. The coordinator keeps one in its run folder; a site keeps one in its store
(``client.site_store``) with the coordinator's version numbers. ``verify`` checks a whole
registry (hashes, manifests, lineage, base fingerprint); ``common.registry_export`` writes
verified PEFT folders elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atomic import whole_write
from common.errors import RegistryError
from common.registry_format import (
    MANIFEST_FILE,
    TEMP_VERSION,
    RegistryVersion,
    lineage_problems,
    read_verified,
    version_problems,
    write_version,
)
from common.scopes import MODULE_NAME

if TYPE_CHECKING:
    # Type names only: `fedlora registry list` and `report` read manifests without torch or peft
    # (seconds of imports on a small machine); the methods that move tensors import them.
    from peft import LoraConfig

    from common.adapters import AdapterState


class Registry:
    """Versions of each module under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def module_dir(self, module: str) -> Path:
        """``<root>/<module>``; RegistryError for a name that is not a module name (``/etc``,
        ``..``), which would put the folder outside the registry."""
        if not MODULE_NAME.fullmatch(module):
            raise RegistryError(f"{module[:80]!r} is not a module name (lowercase, digits, - or _)")
        return self.root / module

    def modules(self) -> list[str]:
        """The modules with a folder in the registry, sorted (hidden folders left out)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name[0] != ".")

    def versions(self, module: str) -> list[RegistryVersion]:
        folder = self.module_dir(module)
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            name = child.name
            if child.is_dir() and name.startswith("v") and name[1:].isdigit():
                found.append(RegistryVersion(module, int(name[1:]), child))
        return sorted(found, key=lambda v: v.version)

    def latest(self, module: str) -> RegistryVersion | None:
        versions = self.versions(module)
        return versions[-1] if versions else None

    def get(self, module: str, version: int | None = None) -> RegistryVersion:
        """One version of ``module`` (None: the latest); a RegistryError names what exists."""
        versions = self.versions(module)
        if not versions:
            known = ", ".join(self.modules()) or "none"
            raise RegistryError(f"{self.root}: no module {module!r} (modules: {known})")
        if version is None:
            return versions[-1]
        for candidate in versions:
            if candidate.version == version:
                return candidate
        numbers = ", ".join(str(v.version) for v in versions)
        raise RegistryError(f"{module}: no version {version} (versions: {numbers})")

    @whole_write
    def publish(
        self,
        module: str,
        state: AdapterState,
        lora: LoraConfig,
        manifest: dict[str, Any],
        number: int | None = None,
    ) -> RegistryVersion:
        """Write the next version of ``module`` (or version ``number``) atomically; return it.

        ``number`` is for a site's registry, which holds the coordinator's version numbers
        (with gaps where it missed a round); its parent is ``number - 1``.
        """
        latest = self.latest(module)
        if number is None:
            number = 0 if latest is None else latest.version + 1
            parent = None if latest is None else latest.version
        else:
            parent = None if number == 0 else number - 1
        final = self.module_dir(module) / f"v{number:04d}"
        lineage = {"module": module, "version": number, "parent": parent}
        write_version(final, state, lora, {**manifest, **lineage})
        return RegistryVersion(module, number, final)

    def load(self, module: str, version: int) -> AdapterState:
        """Load a version's tensors after checking them against the manifest's SHA-256."""
        return read_verified(self.module_dir(module) / f"v{version:04d}")

    def verify(self, module: str | None = None, model_fingerprint: str | None = None) -> list[str]:
        """Check every version of ``module`` (None: of every module).

        Checks that each manifest exists, parses and names its own module and version; that the
        tensors' SHA-256 matches the manifest; that ``adapter_config.json`` parses as a LoRA
        config; that versions run v0000, v0001, ... without gaps, each naming the one before
        as its parent; and, when ``model_fingerprint`` is given, that every manifest's
        ``base_fingerprint`` equals it. Leftover temp folders are warnings: see ``leftovers``.

        Returns
        -------
        list of str
            One line per problem, naming ``<module>/v<NNNN>``; empty when the registry is sound.

        Raises
        ------
        RegistryError
            When the registry folder or the named module does not exist.
        """
        if not self.root.is_dir():
            raise RegistryError(f"{self.root}: no registry folder")
        modules = self.modules() if module is None else [self.get(module).module]
        problems: list[str] = []
        for name in modules:
            versions = self.versions(name)
            problems += lineage_problems(name, versions)
            for entry in versions:
                problems += version_problems(entry, model_fingerprint)
        return problems

    def leftovers(self, module: str | None = None) -> list[str]:
        """Warnings for hidden ``.v<NNNN>.*`` temp folders that an interrupted publish left.

        A complete one (with a manifest) was written but never renamed into place; neither kind
        is a version, and both are safe to delete once no publish is running.
        """
        found = []
        for name in self.modules() if module is None else [module]:
            folder = self.module_dir(name)
            for child in sorted(folder.iterdir()) if folder.is_dir() else []:
                if child.is_dir() and TEMP_VERSION.fullmatch(child.name):
                    complete = (child / MANIFEST_FILE).is_file()
                    kind = "complete, never renamed" if complete else "incomplete"
                    found.append(f"{name}/{child.name}: leftover temp folder of a publish ({kind})")
        return found


def find_registry(path: Path) -> Registry:
    """The registry at ``path``: a run folder (``path/registry``) or a registry folder itself.

    A registry folder holds module folders of ``v<NNNN>`` versions; anything else is a
    RegistryError naming the path.
    """
    if not path.is_dir():
        raise RegistryError(f"{path}: no such folder (expected a run folder or its registry/)")
    if (path / "registry").is_dir():
        return Registry(path / "registry")
    registry = Registry(path)
    if not any(registry.versions(m) for m in registry.modules() if MODULE_NAME.fullmatch(m)):
        raise RegistryError(
            f"{path}: holds no fedlora registry (neither a registry/ folder nor module folders "
            "with v0000, v0001, ... versions)"
        )
    return registry
