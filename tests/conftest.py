"""Test-wide settings: offline, no telemetry, private Flower and Ray folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SCRATCH = Path(tempfile.mkdtemp(prefix="fedlora-tests-"))
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_HOME": str(_SCRATCH / "flwr"),
    "RAY_TMPDIR": str(_SCRATCH / "ray"),
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)
Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def pytest_unconfigure(config: pytest.Config) -> None:
    """The scratch folder goes with the test process (Ray's session logs pile up otherwise)."""
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_ray_cluster() -> Iterator[str]:
    """This test process's Ray cluster (``tests/helpers/shared_ray.py``), its address in
    ``RAY_ADDRESS`` while the process runs."""
    from tests.helpers.shared_ray import start_cluster
    from tests.helpers.subprocesses import kill_ray_processes

    folder = _SCRATCH / "cluster"
    address = start_cluster(folder)
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        kill_ray_processes(folder)


@pytest.fixture(scope="module", autouse=True)
def _ray_for_simulations(request: pytest.FixtureRequest) -> None:
    """Modules marked ``ray`` (those that run Flower's Ray runtime, in this process or in a
    ``fedlora`` command they start) share the process's cluster; the others never start one,
    and a run of theirs on Ray would start its own. ``FEDLORA_TEST_OWN_RAY=1``: every run
    starts its own Ray."""
    if os.environ.get("FEDLORA_TEST_OWN_RAY") == "1":
        return
    items = [item for item in request.session.items if item.module is request.module]
    if any(item.get_closest_marker("ray") for item in items):
        request.getfixturevalue("shared_ray_cluster")


@pytest.fixture
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture
def ray_dir() -> Iterator[Path]:
    """A Ray and Flower folder of the test's own, for a ``fedlora`` command it starts as a job
    (``tests/helpers/subprocesses.py``); short, since Ray's socket paths must fit in 107 bytes
    (AF_UNIX)."""
    path = Path(tempfile.mkdtemp(prefix="ray-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# The test files that take longest (measured with `pytest --durations`), costliest first. Under
# `make test` (pytest-xdist, one file per worker at a time) they start first, so that no long
# file is left running alone at the end while the other worker idles.
_COSTLIEST_FIRST = (
    "test_e2e_resilience.py",
    "test_e2e_loopback.py",
    "test_demo.py",
    "test_interrupt.py",
    "test_resume.py",
    "test_interrupt_compare.py",
    "test_flwr_run.py",
    "test_faults.py",
    "test_simulation.py",
    "test_label_skew.py",
    "test_secrets_hygiene.py",
    "test_simulation_modes.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order files costliest first, then the other slow files, then the rest.

    The sort is by file and stable, so a file's tests stay together and in their order (a
    module fixture is still set up once).
    """
    slow_files = {
        item.path
        for item in items
        if item.get_closest_marker("slow") or item.get_closest_marker("e2e")
    }

    def cost_rank(item: pytest.Item) -> int:
        name = item.path.name
        if name in _COSTLIEST_FIRST:
            return _COSTLIEST_FIRST.index(name)
        return len(_COSTLIEST_FIRST) + (0 if item.path in slow_files else 1)

    items.sort(key=cost_rank)
