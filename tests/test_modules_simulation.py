"""Adapter modules through real Flower: shared, group and private modules, per-site ranks.

examples/tiny.toml in the simulation runtime with every message captured (``RecordingGrid``):
which module's tensors travel (instructions, replies, opened envelopes) and which never do,
how each module aggregates over its own sites, and what each site keeps in its store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message

from common import protocol as P
from common.adapters import AdapterState, aggregate_fedavg, apply_delta
from common.config import RunConfig, load_config
from common.encoding import decode_delta
from common.exact import aggregate_exact, factors_for_site_rank, rank_fill_seed
from common.modules import split_modules
from common.registry import Registry
from fedlora.inference import load_with_adapters
from tests.helpers.in_process import IN_PROCESS
from tests.helpers.recording import RecordingGrid, open_envelope, payload_bytes, simulate_recorded

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MODULES = [
    "federation.rounds=2",
    "modules.shared.rank=4",
    "modules.style.scope='private'",
    "modules.style.rank=2",
    "modules.style.targets=['q_proj']",
    "modules.qa.scope='group:qa'",
    "modules.creative.scope='group:creative'",
    "groups.qa=['site-0', 'site-1']",
    "groups.creative=['site-2']",
]
RANKS = [
    "federation.rounds=1",
    "aggregation.rule='exact'",
    "modules.shared.site-ranks={site-2 = 2}",
]


def _simulate(out: Path, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(REPO / "examples" / "tiny.toml", [IN_PROCESS, *overrides])
    run = simulate_recorded(cfg, out)
    assert all(m["rejected"] == [] for m in run["metrics"]), run["metrics"]
    return run


@pytest.fixture(scope="module")
def modules_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _simulate(tmp_path_factory.mktemp("modules") / "out", MODULES)


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _simulate(tmp_path_factory.mktemp("ranks") / "out", RANKS)


def _train_replies(run: dict[str, Any], server_round: int) -> dict[str, Message]:
    grid: RecordingGrid = run["grid"]
    replies = {}
    for m in grid.received:
        update = m.content.config_records.get(P.UPDATE_RECORD) if m.has_content() else None
        carries = update is not None and bool(P.delta_modules(update.keys()))
        if carries and update is not None and update.get(P.KEY_ROUND) == server_round:
            replies[str(update[P.KEY_SITE])] = m
    return replies


def _opened(run: dict[str, Any], reply: Message) -> dict[str, AdapterState]:
    """Every module delta of a reply, opened as the coordinator does."""
    update = reply.content.config_records[P.UPDATE_RECORD]
    return {
        module: decode_delta(open_envelope(run["coord"], reply, module), 1 << 30)
        for module in P.delta_modules(update.keys())
    }


def _assert_published(
    published: torch.Tensor, expected: torch.Tensor, base: torch.Tensor, rtol: float, atol: float
) -> None:
    """``published`` is ``expected`` up to ``rtol``/``atol`` and the fp16 rounding of its step
    from ``base`` (federation.downlink: half an fp16 ulp, 2^-11 of each step element)."""
    step = (expected - base).abs()
    error = (published - expected).abs()
    assert bool((error <= step * 2.0**-11 + rtol * expected.abs() + atol).all())


def _weight(run: dict[str, Any], reply: Message) -> float:
    """The example count from the site's sealed report."""
    report = P.parse_report(open_envelope(run["coord"], reply, P.REPORT_MODULE))
    return float(report[P.METRIC_EXAMPLES])


def test_each_site_sends_its_shared_and_group_modules_only(modules_run: dict[str, Any]) -> None:
    for server_round in (1, 2):
        replies = _train_replies(modules_run, server_round)
        sent = {site: sorted(_opened(modules_run, r)) for site, r in replies.items()}
        assert sent == {
            "site-0": ["qa", "shared"],
            "site-1": ["qa", "shared"],
            "site-2": ["creative", "shared"],
        }


def test_the_private_module_never_travels(modules_run: dict[str, Any]) -> None:
    run_id = modules_run["coord"].run_id
    grid: RecordingGrid = modules_run["grid"]
    out: Path = modules_run["out"]
    for message in grid.sent:  # instructions carry the sent modules' global state only
        if message.content.array_records:
            modules = set(split_modules(message.content.array_records[P.GLOBAL_RECORD]))
            assert modules == {"creative", "qa", "shared"}
    kept = []  # every private state a site trained: no 16-byte window of it crosses the grid
    for site in ("site-0", "site-1", "site-2"):
        registry = Registry(out / "sites" / site / run_id / "registry")
        for version in registry.versions("style")[1:]:
            trained = registry.load("style", version.version)
            kept.append(b"".join(t.numpy().tobytes() for t in trained.values()))
    assert len(kept) == 3 * 2  # 3 sites, versions 1 and 2
    plaintexts = [
        b"".join(t.numpy().tobytes() for d in _opened(modules_run, r).values() for t in d.values())
        for server_round in (1, 2)
        for r in _train_replies(modules_run, server_round).values()
    ]
    wire = [payload_bytes(m) for m in [*grid.sent, *grid.received]]
    for state in kept:
        for start in range(0, len(state) - 16, 499):
            window = state[start : start + 16]
            assert not any(window in blob for blob in [*wire, *plaintexts])
    assert "style" not in Registry(out / "registry").modules()


def test_group_modules_aggregate_over_their_group(modules_run: dict[str, Any]) -> None:
    registry = Registry(modules_run["out"] / "registry")
    replies = _train_replies(modules_run, 1)
    for module, members in {"qa": ["site-0", "site-1"], "creative": ["site-2"]}.items():
        assert registry.get(module, 1).manifest["cohort"] == members
        deltas = [_opened(modules_run, replies[s])[module] for s in members]
        weights = [_weight(modules_run, replies[s]) for s in members]
        v0 = registry.load(module, 0)
        expected = apply_delta(v0, aggregate_fedavg(deltas, weights))
        for key, value in registry.load(module, 1).items():
            _assert_published(value, expected[key], v0[key], rtol=1e-6, atol=1e-7)
    assert registry.get("shared", 1).manifest["cohort"] == ["site-0", "site-1", "site-2"]


def test_sites_keep_what_they_hold_and_load_it_for_inference(modules_run: dict[str, Any]) -> None:
    out: Path = modules_run["out"]
    run_id = modules_run["coord"].run_id  # each run has its own part of a site's store
    sites = ("site-0", "site-1", "site-2")
    stores = {s: Registry(out / "sites" / s / run_id / "registry") for s in sites}
    assert stores["site-0"].modules() == ["qa", "shared", "style"]
    assert stores["site-2"].modules() == ["creative", "shared", "style"]
    for store in stores.values():
        assert [v.version for v in store.versions("style")] == [0, 1, 2]
        assert store.verify() == []
        assert store.get("style", 2).manifest["source"] == "trained at this site"
    # Received versions are the coordinator's, byte for byte.
    coordinator = Registry(out / "registry")
    for version in (0, 1, 2):
        theirs = coordinator.load("shared", version)
        mine = stores["site-1"].load("shared", version)
        assert theirs and sorted(mine) == sorted(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    privates = [store.load("style", 2) for store in stores.values()]
    key = next(k for k in privates[0] if "lora_B" in k)
    assert not torch.equal(privates[0][key], privates[1][key])  # each site's own
    folders = [stores["site-0"].get(m, 2).path for m in ("shared", "qa", "style")]
    _, model, _ = load_with_adapters("tiny-llama", "causal-lm", folders)
    assert len(model.base_model.active_adapters) == 3


def test_a_site_with_its_own_rank_joins_exact_aggregation(ranks_run: dict[str, Any]) -> None:
    cfg: RunConfig = ranks_run["cfg"]
    registry = Registry(ranks_run["out"] / "registry")
    replies = _train_replies(ranks_run, 1)
    deltas = {site: _opened(ranks_run, r)["shared"] for site, r in replies.items()}
    a_key = next(k for k in deltas["site-0"] if "lora_A" in k)
    assert deltas["site-0"][a_key].shape[0] == 4 and deltas["site-2"][a_key].shape[0] == 2
    v0 = registry.load("shared", 0)
    states, scalings, weights = [], [], []
    for site, delta in sorted(deltas.items()):
        rank = 2 if site == "site-2" else 4
        start = (
            v0
            if rank == 4
            else factors_for_site_rank(v0, 2, 8 / 4, 8 / 2, rank_fill_seed(0, 0, "shared"))
        )
        states.append({k: start[k] + delta[k] for k in start})
        scalings.append(8 / rank)
        weights.append(_weight(ranks_run, replies[site]))
    expected = aggregate_exact(
        states, weights, scalings, 4, 2.0, fill_seed=cfg.train.seed * 100_003 + 1
    )
    for key, value in registry.load("shared", 1).items():
        _assert_published(value, expected[key], v0[key], rtol=1e-5, atol=1e-6)
    assert registry.get("shared", 1).manifest["site_ranks"] == {
        "site-0": 4,
        "site-1": 4,
        "site-2": 2,
    }
