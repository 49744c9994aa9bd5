"""The Python that the shell scripts run still imports (no script runs in the suite's time).

``scripts/e2e-loopback.sh`` checks its registry with an inline Python program; when the
registry moved from ``server/`` to ``common/`` the script broke, and nothing noticed until a
benchmark (``benchmarks/bench_deploy.py``) ran it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.sh"))
FROM_IMPORT = re.compile(r"^from ([\w.]+) import ([\w, ]+)$", re.MULTILINE)


def test_there_are_scripts_with_python_in_them() -> None:
    assert any(FROM_IMPORT.search(path.read_text()) for path in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_name_a_script_imports_exists(script: Path) -> None:
    for module, names in FROM_IMPORT.findall(script.read_text()):
        imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(imported, name), f"{script.name}: {module} has no {name}"
