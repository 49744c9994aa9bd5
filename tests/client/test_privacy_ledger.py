"""A site's DP releases across runs (``client.privacy_ledger``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType

from client.privacy_ledger import PRIVACY_LEDGER_FILE, PrivacyLedger
from common.errors import UpdateRejected
from tests.helpers.in_process import flower_task_identity

task_identity = pytest.fixture(flower_task_identity)  # Flower's task id, for in-process apps


def test_earlier_runs_are_remembered_in_the_store_and_the_current_one_left_out(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path)
    assert ledger.earlier("run-a") == ()
    for server_round in (1, 2, 3, 2):  # a redone round does not lower the count
        ledger.record("run-a", server_round, 1.0)
    ledger.record("run-b", 1, 0.5)
    assert ledger.earlier("run-b") == ((1.0, 3),)
    # Another process (the next message's ClientApp, a restarted site) reads the same file.
    again = PrivacyLedger(tmp_path)
    assert again.earlier("run-c") == ((0.5, 1), (1.0, 3))
    assert again.earlier("run-a") == ((0.5, 1),)


def test_a_run_at_two_multipliers_counts_both(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.record("run-a", 2, 1.0)
    ledger.record("run-a", 4, 2.0)
    assert PrivacyLedger(tmp_path).earlier("x") == ((1.0, 2), (2.0, 4))


def test_in_memory_without_a_store() -> None:
    ledger = PrivacyLedger(None)
    ledger.record("run-a", 2, 1.0)
    assert ledger.earlier("run-b") == ((1.0, 2),)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "{}",
        '{"runs": {"r": {"1.0": -1}}}',
        '{"runs": {"r": {"1.0": 1.5}}}',
        '{"runs": {"r": {"zero": 1}}}',
        '{"runs": {"r": {"0": 1}}}',
        '{"runs": {"r": {"nan": 1}}}',
        '{"runs": []}',
    ],
)
def test_an_unreadable_ledger_is_refused_naming_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / PRIVACY_LEDGER_FILE).write_text(text)
    with pytest.raises(UpdateRejected, match=PRIVACY_LEDGER_FILE):
        PrivacyLedger(tmp_path).earlier("run-a")


@pytest.mark.slow  # two real one-round federations of the tiny model, in process (~20 s)
def test_a_new_run_does_not_reset_what_a_site_has_spent(
    tmp_path: Path, task_identity: None
) -> None:
    """The real coordinator and site glue over ``InProcessGrid``: one DP round fits the
    site's max-epsilon, two do not. A second run (a new run id, round 1 again) on the same
    site stores is refused by every site, naming the earlier runs; no site trains."""
    from client.app import ERROR_REFUSED, SiteKeys, client_app, simulation_sites
    from common.config import load_config
    from common.dp import rdp_epsilon
    from fedlora.simulate import provision_keys
    from server.federation import prepare, run_federation
    from tests.helpers.in_process import InProcessGrid

    budget = (rdp_epsilon(1.0, 1.0, 1e-5, 1) + rdp_epsilon(1.0, 1.0, 1e-5, 2)) / 2
    tiny = Path(__file__).resolve().parents[2] / "examples" / "tiny.toml"
    cfg = load_config(
        tiny,
        [
            "federation.rounds=1",
            "data.partition='iid'",
            "train.local-steps=1",
            "privacy.dp.enabled=true",
            "privacy.dp.noise-multiplier=1.0",
            "privacy.dp.clip=0.5",
            f"site-policy.max-epsilon={budget}",
        ],
    )
    sites = tmp_path / "sites"  # the sites' stores, kept across both runs

    def run(out: Path) -> list[Message]:
        sealing, _ = provision_keys(cfg, out)
        app = client_app(
            simulation_sites(cfg, sites), SiteKeys(out / "keys"), lambda _: cfg.site_policy
        )
        trains: list[Message] = []

        def recording(msg: Message, context: Context) -> Message:
            reply = app(msg, context)
            if msg.metadata.message_type == MessageType.TRAIN:
                trains.append(reply)
            return reply

        run_federation(InProcessGrid(recording, cfg.federation.sites), prepare(cfg, out, sealing))
        return trains

    first = run(tmp_path / "run-1")
    assert first and not any(reply.has_error() for reply in first)
    second = run(tmp_path / "run-2")
    assert len(second) == len(first)
    for reply in second:
        assert reply.has_error() and reply.error.code == ERROR_REFUSED
        assert "after 1 round(s) of earlier runs" in reply.error.reason, reply.error.reason
