"""Crash and resume: SIGKILL the whole simulation mid-run, resume, and compare bit for bit.

The run has a shared, a group and a private module, so what the sites keep between rounds
(``<out>/sites/<id>/<run-id>``) must resume exactly too.

The runs killed at two points run on Ray of their own, as a user's would; the sampled one, the
resumed runs and the references run on the in-process runtime (``IN_PROCESS``), which publishes
the same versions (``tests/test_simulation.py``). A run killed on Ray and resumed in process is
resumed from its run folder alone: ``simulation.backend`` is not part of the config digest.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.registry import Registry
from common.registry_format import ADAPTER_FILE
from tests.helpers.in_process import IN_PROCESS
from tests.helpers.subprocesses import kill_everything, ray_env, rounds_done

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3  # a kill in round 2 and one after v0002 both leave rounds to resume
SETTINGS = [
    f"federation.rounds={ROUNDS}",
    "modules.style.scope='private'",
    "modules.style.rank=2",
    "modules.qa.scope='group:qa'",
    "groups.qa=['site-0', 'site-2']",
]
# The same run with 4 sites, half of them drawn to train and half to evaluate each round.
SAMPLED = [
    *SETTINGS,
    "federation.sites=4",
    "data.partition='iid'",
    "federation.fraction-train=0.5",
    "federation.fraction-evaluate=0.5",
]


def _args(settings: list[str]) -> list[str]:
    return ["examples/tiny.toml", *(arg for item in settings for arg in ("--set", item))]


def _start(
    out: Path,
    ray_dir: Path,
    resume: bool = False,
    settings: list[str] = SETTINGS,
    on_ray: bool = False,
) -> subprocess.Popen[bytes]:
    """``fedlora simulate`` as a process of its own, on the in-process runtime, or with
    ``on_ray`` on a Ray of its own (a run to be SIGKILLed, as a user's would be)."""
    settings = settings if on_ray else [*settings, IN_PROCESS]
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", *_args(settings), "--out", str(out)]
    return subprocess.Popen(
        [*cmd, "--resume"] if resume else cmd,
        cwd=REPO,
        env=ray_env(ray_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: SIGKILL reaches Ray's workers too
    )


def _versions(out: Path) -> list[int]:
    return [v.version for v in Registry(out / "registry").versions("shared")]


def _digests(out: Path) -> dict[str, str]:
    """SHA-256 of every version of every module, at the coordinator and in each site store."""
    registries = [out / "registry", *sorted((out / "sites").glob("*/*/registry"))]
    digests = {}
    for root in registries:
        registry = Registry(root)
        for module in registry.modules():
            for v in registry.versions(module):
                # The run id differs between the two runs: name the site, not the run.
                name = f"{root.relative_to(out).parts[:2]}/{v.name}"
                digests[name] = hashlib.sha256((v.path / ADAPTER_FILE).read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    with tempfile.TemporaryDirectory(prefix="ray-") as ray:
        assert _start(out, Path(ray)).wait(timeout=600) == 0
    return out


KILL_POINTS: dict[str, Callable[[Path], bool]] = {
    # Round 1 is recorded: round 2 is training at the sites.
    "during-round-2-training": lambda out: rounds_done(out) >= 1,
    # Round 2's version is published: its evaluation (or round 3's start) is in flight.
    "after-publishing-v0002": lambda out: 2 in _versions(out),
}


@pytest.mark.parametrize("kill_point", sorted(KILL_POINTS))
def test_sigkill_then_resume_is_bit_identical(
    tmp_path: Path, reference: Path, kill_point: str
) -> None:
    out = tmp_path / "run"
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    proc = _start(out, ray_dir, on_ray=True)
    deadline = time.monotonic() + 300
    while not KILL_POINTS[kill_point](out):
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    kill_everything(proc, ray_dir)
    assert rounds_done(out) < ROUNDS

    resumed = _start(out, ray_dir, resume=True)  # nothing of the first is left
    assert resumed.wait(timeout=600) == 0

    assert _versions(out) == list(range(ROUNDS + 1))  # none lost, none duplicated
    digests = _digests(out)
    assert digests == _digests(reference)  # every version, every module and site: identical
    assert f"('sites', 'site-1')/style/v{ROUNDS:04d}" in digests  # the private module resumed too
    assert "('sites', 'site-1')/qa/v0000" not in digests  # site-1 is not in group qa
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(ROUNDS + 1))
    assert not [p for p in (out / "registry" / "shared").iterdir() if p.name.startswith(".")]


def _cohorts(out: Path) -> list[tuple[list[str] | None, list[str] | None]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(line.get("sampled_train"), line.get("sampled_evaluate")) for line in lines]


@pytest.fixture(scope="module")
def sampled_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sampled-reference") / "run"
    with tempfile.TemporaryDirectory(prefix="ray-") as ray:
        assert _start(out, Path(ray), settings=SAMPLED).wait(timeout=600) == 0
    return out


def test_sampled_run_killed_and_resumed_is_bit_identical(
    tmp_path: Path, sampled_reference: Path
) -> None:
    """The resumed coordinator has new Flower node ids; it draws the same cohorts from the
    site ids, so every version at the coordinator and at every site is the same, bit for bit."""
    out = tmp_path / "run"
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    proc = _start(out, ray_dir, settings=SAMPLED)
    deadline = time.monotonic() + 300
    while rounds_done(out) < 1:  # round 2 is training at its cohort
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    kill_everything(proc, ray_dir)
    assert rounds_done(out) < ROUNDS

    resumed = _start(out, ray_dir, resume=True, settings=SAMPLED)
    assert resumed.wait(timeout=600) == 0

    assert _versions(out) == list(range(ROUNDS + 1))
    assert _cohorts(out) == _cohorts(sampled_reference)
    trained = [train for train, _ in _cohorts(out)[1:]]
    assert all(train is not None and len(train) == 2 for train in trained)
    assert len({tuple(train or []) for train in trained}) > 1  # the cohorts do change
    assert _digests(out) == _digests(sampled_reference)
