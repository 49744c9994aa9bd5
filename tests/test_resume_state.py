"""Resume restores the run's state bit for bit: DP accountant and noise RNG, FedAdam, exact,
private modules and secure sum, the last also with the coordinator killed mid-protocol.

The real coordinator (``server.federation.run_federation``) and the real site glue
(``client.app``) run in this process over ``InProcessGrid``, with no Ray and no SuperLink: a
"crash" is an exception at a stage boundary, after which a new coordinator is prepared from
the run folder alone (as a restarted process would be) and resumes. Every published version
of every module, every round's epsilon and the final checkpoint must equal an uninterrupted
run's, and so must every tensor file in every site's store (its registry, the private
modules it keeps, the versions it received). A resume that forgot the accountant (epsilon
restarts at 0), reseeded the noise (the first round's noise again) or dropped the FedAdam
moments differs from the reference.

Secure sum is killed between its stages too. Before the masked inputs leave, a redone round
is bit-identical (the sites train again from the same seeds; new masks cancel all the same).
After they left, a bit-identical resume is impossible by design: each site sends one masked
input per round ever (``client.round_claims``), so the redone round publishes nothing and the
run goes on (``test_secure_sum_round_redone_after_the_masked_inputs_gets_none``).

Tiny settings (2 sites, 3 for secure sum, 1 local step, 3 rounds, no Ray): about 10 s per test
on 2 cores, plus about 8 s per configuration for the uninterrupted reference run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client.app import make_client_app
from common import protocol as P
from common.config import RunConfig, load_config
from common.registry import Registry
from common.registry_format import ADAPTER_FILE
from fedlora.simulate import provision_keys
from server.audit import AUDIT_FILE, EVENT_REPLY_REJECTED, read_entries
from server.checkpoint import load_checkpoint
from server.federation import prepare, run_federation
from tests.helpers.in_process import Crash, InProcessGrid, flower_task_identity

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3
TINY = [
    f"federation.rounds={ROUNDS}",
    "federation.sites=2",
    "federation.min-sites=2",
    "data.partition='iid'",
    "train.local-steps=1",
    "privacy.mode='none'",
]
CONFIGS = {
    # Central DP with a fixed noise seed (tests only): the noise is reproducible, so a resumed
    # run that restarted the generator from the seed publishes round 1's noise again.
    "dp-central": [
        "privacy.dp.enabled=true",
        "privacy.dp.clip=0.05",
        "privacy.dp.noise-multiplier=0.5",
        "privacy.dp.seed=7",
    ],
    # FedAdam: first and second moments and the step count carry over between rounds.
    "fedadam": ["aggregation.server-optimizer='fedadam'", "aggregation.server-lr=0.01"],
    # SCAFFOLD: the coordinator's control variate c carries over; the sites keep their c_i
    # in their stores, so a redone round starts from the same c_i.
    "scaffold": ["train.scaffold=true", "train.optimizer='sgd'", "train.lr=0.05"],
    # exact: the weighted mean of the products B_i A_i, re-factored each round (a factor rule).
    "exact": ["aggregation.rule='exact'"],
    # A private module beside the shared one: trained and kept in each site's store, never sent.
    "private-module": ["modules.style.scope='private'", "modules.style.rank=2"],
    # Secure sum over 3 sites: the round's five stages, protocol state in the sites' contexts.
    "secure-sum": ["privacy.mode='secure-sum'", "federation.sites=3", "federation.min-sites=3"],
}


task_identity = pytest.fixture(scope="module", autouse=True)(flower_task_identity)


def _config(name: str) -> RunConfig:
    return load_config(REPO / "examples" / "tiny.toml", [*TINY, *CONFIGS[name]])


def _run(
    cfg: RunConfig, out: Path, crash_before: tuple[int, str] | tuple[int, str, int] | None = None
) -> None:
    """A run from scratch, or, with ``crash_before``, one killed there and then resumed by a
    coordinator that knows only the run folder (and the keys, which outlive a crash)."""
    sealing, keys = provision_keys(cfg, out)
    app = make_client_app(cfg, keys, out / "sites")
    if crash_before is None:
        run_federation(InProcessGrid(app, cfg.federation.sites), prepare(cfg, out, sealing))
        return
    with pytest.raises(Crash):
        grid = InProcessGrid(app, cfg.federation.sites, crash_before)
        run_federation(grid, prepare(cfg, out, sealing))
    # A restarted process: a new coordinator (fresh Aggregator), new site contexts.
    app = make_client_app(cfg, keys, out / "sites")
    grid = InProcessGrid(app, cfg.federation.sites)
    run_federation(grid, prepare(cfg, out, sealing), resume=True)


def _site_files(out: Path) -> dict[str, str]:
    """SHA-256 of every tensor file in every site's store (registry versions, kept private and
    fedsa state, received versions), named by site and path without the run id."""
    found = {}
    for path in sorted((out / "sites").rglob("*.safetensors")):
        site, _run_id, *rest = path.relative_to(out / "sites").parts
        found["/".join([site, *rest])] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _published(out: Path) -> dict[str, Any]:
    """Every version of every module (SHA-256 of its tensors, its manifest's epsilon), each
    round's epsilon and evaluation loss, the final checkpoint's aggregator state and the
    tensor files of every site store."""
    registry = Registry(out / "registry")
    versions = {
        v.name: (
            hashlib.sha256((v.path / ADAPTER_FILE).read_bytes()).hexdigest(),
            json.loads((v.path / "manifest.json").read_text()).get("epsilon"),
        )
        for module in registry.modules()
        for v in registry.versions(module)
    }
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ckpt = load_checkpoint(out)
    assert ckpt is not None
    return {
        "versions": versions,
        "rounds": [(m["round"], m.get("epsilon"), m.get("eval_loss")) for m in lines],
        "aggregator": ckpt.extra["aggregator"],
        "optimizer": {
            k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
            for k, v in ckpt.optimizer_tensors.items()
        },
        "sites": _site_files(out),
    }


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """The uninterrupted run of a configuration, made the first time a test needs it."""
    done: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in done:
            out = tmp_path_factory.mktemp(f"reference-{name}") / "run"
            _run(_config(name), out)
            done[name] = _published(out)
        return done[name]

    return get


# Stage boundaries: before round 2's training (round 1 checkpointed and evaluated), and
# between round 2's checkpoint and its evaluation. With a private module also in the middle
# of round 2's training: site-0 trained (and kept its module), site-1 not yet; the redone
# round must start site-0 from what it kept after round 1, not after the lost round 2. In
# secure sum before its share and mask stages: every site trained and holds round 2's
# protocol state, and no masked input has left.
CRASHES: list[tuple[int, str] | tuple[int, str, int]] = [(2, "train"), (2, "evaluate")]
EXTRA: dict[str, list[tuple[int, str] | tuple[int, str, int]]] = {
    "private-module": [(2, "train", 2)],
    "secure-sum": [(2, P.STAGE_SHARE), (2, P.STAGE_MASK)],
}
CASES = [(name, crash) for name in sorted(CONFIGS) for crash in CRASHES + EXTRA.get(name, [])]


def _case_id(name: str, crash: tuple[int, str] | tuple[int, str, int]) -> str:
    node = f"-node-{crash[2]}" if len(crash) == 3 else ""
    return f"{name}-before-{crash[1]}-{crash[0]}{node}"


@pytest.mark.parametrize(("name", "crash_before"), CASES, ids=[_case_id(*c) for c in CASES])
def test_resume_is_bit_identical(
    tmp_path: Path,
    references: Callable[[str], dict[str, Any]],
    name: str,
    crash_before: tuple[int, str] | tuple[int, str, int],
) -> None:
    expected = references(name)
    out = tmp_path / "run"
    _run(_config(name), out, crash_before)
    got = _published(out)
    assert got["versions"] == expected["versions"]  # every version of every module
    assert got["rounds"] == expected["rounds"]  # every round's epsilon, in metrics.jsonl
    assert got["aggregator"] == expected["aggregator"]  # accountant, noise RNG, scalars
    assert got["optimizer"] == expected["optimizer"]  # FedAdam's moments
    assert got["sites"] == expected["sites"]  # what every site keeps and received
    assert sorted(got["versions"]) == [f"shared/v{v:04d}" for v in range(ROUNDS + 1)]
    if name == "dp-central":
        epsilons = [eps for _, eps, _ in got["rounds"]]
        assert all(e is not None for e in epsilons) and epsilons == sorted(epsilons)
        assert epsilons[-1] > epsilons[1] > 0  # spent over all rounds, not since the resume
    elif name == "scaffold":
        assert any(k.startswith("scaffold-c/") for k in got["optimizer"]), got["optimizer"]
        assert any("kept/" in path for path in got["sites"])  # each site's c_i, resumed too
    elif name == "fedadam":
        assert got["optimizer"], "FedAdam keeps moment tensors"
    elif name == "private-module":  # each site's own style module, every round, resumed too
        assert sum("/style/" in path for path in got["sites"]) >= 2 * ROUNDS


def test_secure_sum_round_redone_after_the_masked_inputs_gets_none(
    tmp_path: Path, references: Callable[[str], dict[str, Any]]
) -> None:
    """Killed after the sites sent round 2's masked inputs (before the consistency round):
    every site refuses a second masked input for round 2, so the redone round publishes
    nothing; the versions before it are the reference's, bit for bit, and round 3 publishes."""
    expected = references("secure-sum")
    out = tmp_path / "run"
    _run(_config("secure-sum"), out, (2, P.STAGE_CONFIRM))
    got = _published(out)
    before = ["shared/v0000", "shared/v0001"]
    assert {v: got["versions"][v] for v in before} == {v: expected["versions"][v] for v in before}
    assert sorted(got["versions"]) == [*before, "shared/v0002"]  # round 3's, one round fewer
    assert got["versions"]["shared/v0002"] != expected["versions"]["shared/v0002"]
    refusals = [
        entry["reason"]
        for entry in read_entries(out / AUDIT_FILE)
        if entry["event"] == EVENT_REPLY_REJECTED and entry["round"] == 2
    ]
    assert sum("already sent a masked input for round 2" in r for r in refusals) == 3, refusals
