"""Site sampling through the real simulation path: 6 tiny sites, half of them per stage.

Every message between coordinator and sites is recorded, so the tests check what was sent to
whom, not only what the coordinator wrote down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message, MessageType

from client.received import KEEP_RECEIVED
from common import protocol as P
from common.config import load_config
from common.registry import Registry
from common.sampling import STAGE_EVALUATE, STAGE_TRAIN, draw_cohort
from server.audit import AUDIT_FILE, read_entries
from tests.helpers.in_process import IN_PROCESS
from tests.helpers.recording import RecordingGrid, simulate_recorded

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"
SITES = [f"site-{i}" for i in range(6)]
SAMPLED = [
    "federation.sites=6",
    "data.partition='iid'",  # tiny.toml's by-column split has 3 categories: 3 sites at most
    "federation.fraction-train=0.5",
    "federation.fraction-evaluate=0.5",
    "federation.sampling-seed=3",
]


def simulate_sampled(out: Path, *overrides: str) -> dict[str, Any]:
    return simulate_recorded(load_config(TINY, [IN_PROCESS, *overrides]), out)


def node_sites(grid: RecordingGrid) -> dict[int, str]:
    """Node id -> site, from the sites' own answers to the identify query."""
    names = {}
    for reply in grid.received:
        if reply.metadata.message_type == MessageType.QUERY and reply.has_content():
            update = reply.content.config_records[P.UPDATE_RECORD]
            names[reply.metadata.src_node_id] = str(update[P.KEY_SITE])
    return names


def instructions(grid: RecordingGrid, kind: str) -> list[Message]:
    return [m for m in grid.sent if m.metadata.message_type == kind]


def header(message: Message) -> Any:
    return message.content.config_records[P.HEADER_RECORD]


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sampled") / "run"
    return simulate_sampled(out, "federation.rounds=4", *SAMPLED)


def expected(stage: str, server_round: int) -> list[str]:
    return draw_cohort(SITES, 3, 3, server_round, stage)


def test_only_the_drawn_sites_are_instructed_and_train(sealed: dict[str, Any]) -> None:
    grid, metrics = sealed["grid"], sealed["metrics"]
    names = node_sites(grid)
    assert sorted(names.values()) == SITES  # every node identified, once
    assert len(instructions(grid, MessageType.QUERY)) == 6
    assert all(not m["rejected"] for m in metrics)
    for server_round in range(1, 5):
        drawn = expected(STAGE_TRAIN, server_round)
        line = metrics[server_round]
        assert line["sampled_train"] == drawn and line["available_sites"] == 6
        assert line["cohort"] == drawn  # exactly the drawn sites' deltas were aggregated
        assert sorted(line["sites"]) == sorted(set(drawn) | set(line["sampled_evaluate"]))
        sent = [
            names[m.metadata.dst_node_id]
            for m in instructions(grid, MessageType.TRAIN)
            if header(m)[P.KEY_ROUND] == server_round
        ]
        assert sorted(sent) == drawn  # no train message to a site that was not drawn
    for server_round in range(5):
        drawn = expected(STAGE_EVALUATE, server_round)
        assert metrics[server_round]["sampled_evaluate"] == drawn
        sent = [
            names[m.metadata.dst_node_id]
            for m in instructions(grid, MessageType.EVALUATE)
            if header(m)[P.KEY_ROUND] == server_round
        ]
        assert sorted(sent) == drawn
    # The draws differ between rounds (else this run would not show sampling at all).
    assert len({tuple(expected(STAGE_TRAIN, r)) for r in range(1, 5)}) > 1


def test_the_audit_log_records_each_cohort(sealed: dict[str, Any]) -> None:
    entries = read_entries(sealed["out"] / AUDIT_FILE)
    sampled = [e for e in entries if e["event"] == "cohort-sampled"]
    got = {(e["round"], e["stage"]): e["sites"] for e in sampled}
    assert all(e["available"] == 6 for e in sampled)
    for server_round in range(1, 5):
        assert got[(server_round, STAGE_TRAIN)] == expected(STAGE_TRAIN, server_round)
    for server_round in range(5):
        assert got[(server_round, STAGE_EVALUATE)] == expected(STAGE_EVALUATE, server_round)
    started = [e for e in entries if e["event"] == "round-started"]
    assert [e["cohort_size"] for e in started] == [3, 3, 3, 3]


def test_a_site_skipped_for_rounds_gets_the_full_state_and_answers(sealed: dict[str, Any]) -> None:
    """A step is sent only from the version a site confirmed last; a site that missed two or
    more versions gets the full state, rebuilds it, checks its SHA-256 and trains."""
    grid = sealed["grid"]
    held: dict[int, int] = {}  # node -> the newest version it was sent (and confirmed: no
    skipped = 0  # rejections in this run, see the test above)
    sent = [m for m in grid.sent if m.metadata.message_type != MessageType.QUERY]
    for message in sent:
        node, head = message.metadata.dst_node_id, header(message)
        version, form = int(head[P.KEY_VERSION]), head[P.KEY_GLOBAL_FORM]
        last = held.get(node)
        if last is None or version - last >= 2:
            assert form == P.FORM_FULL, (node, last, version, form)
            skipped += last is not None
        elif version - last == 1:
            assert form == P.FORM_STEP
        else:
            assert form == P.FORM_REFERENCE
        held[node] = version
    assert skipped >= 1  # this seed has such a site: the path is exercised
    # Each site holds the versions it was sent (the newest KEEP_RECEIVED of them): a site
    # never drawn for a version's stage has no copy of it (nothing changes at an undrawn site).
    names = node_sites(grid)
    run_id = sealed["coord"].run_id
    for node, site in names.items():
        versions = {int(header(m)[P.KEY_VERSION]) for m in sent if m.metadata.dst_node_id == node}
        folder = sealed["out"] / "sites" / site / run_id / "received"
        stored = {int(p.stem[1:]) for p in folder.iterdir()} if folder.exists() else set()
        assert stored == set(sorted(versions)[-KEEP_RECEIVED:]), site  # the newest it keeps


def test_the_progress_line_and_summary_show_the_cohort(
    sealed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from server.metrics import report_round

    report_round(sealed["metrics"][2])
    printed = " ".join(capsys.readouterr().out.split())  # the table title wraps
    assert "3/6 sites trained, 3/6 sites evaluated" in printed
    assert [v.version for v in Registry(sealed["out"] / "registry").versions("shared")] == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_secure_sum_runs_over_the_sampled_cohort(tmp_path: Path) -> None:
    run = simulate_sampled(
        tmp_path / "run", "federation.rounds=2", "privacy.mode='secure-sum'", *SAMPLED
    )
    grid, metrics = run["grid"], run["metrics"]
    assert all(not m["rejected"] for m in metrics)
    names = node_sites(grid)
    for server_round in (1, 2):
        drawn = expected(STAGE_TRAIN, server_round)
        assert metrics[server_round]["cohort"] == drawn  # the survivors: the whole cohort
        stages = [
            m
            for m in instructions(grid, MessageType.TRAIN)
            if header(m)[P.KEY_ROUND] == server_round
        ]
        # Every stage of the protocol (train, share, mask, confirm, unmask) went to the
        # cohort only, numbered 1..3 among themselves, with parameters for 3 sites.
        assert sorted({names[m.metadata.dst_node_id] for m in stages}) == drawn
        assert len(stages) == 5 * 3
        for message in stages:
            numbers = json.loads(str(header(message)[P.KEY_SITE_NUMBERS]))
            assert numbers == {site: i + 1 for i, site in enumerate(drawn)}
            params = json.loads(str(header(message)[P.KEY_SECAGG_PARAMS]))
            assert params["num-sites" if "num-sites" in params else "num_sites"] == 3
    assert [v.version for v in Registry(run["out"] / "registry").versions("shared")] == [0, 1, 2]
