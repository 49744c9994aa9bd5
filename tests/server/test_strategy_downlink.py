"""Which form of a global version each site gets, and that sites rebuild it from the messages.

The coordinator's instructions are built by the strategy and read by the site's own
``client.app._global``; replies are built by hand (the simulation test is in
``tests/test_simulation_modes.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from client.app import _global, _header
from client.received import GlobalVersionMissing, ReceivedVersions
from common import protocol as P
from common.config import RunConfig, load_config, site_plan
from common.downlink import state_sha256
from server.downlink import Downlink
from server.strategy import FedLoraStrategy
from tests.helpers.flower_identity import task_identity

FINGERPRINT = "f" * 64
V0 = {"shared/a.lora_A.weight": torch.ones(2, 4), "shared/a.lora_B.weight": torch.zeros(4, 2)}
AGGREGATE = {
    "shared/a.lora_A.weight": torch.full((2, 4), 1.1),
    "shared/a.lora_B.weight": torch.full((4, 2), 0.3),
}
NODES = [1, 2, 3]
FULL_BYTES = sum(len(array.data) for array in ArrayRecord(V0).values())  # .npy, as sent


@pytest.fixture(autouse=True)
def stamped_messages() -> Iterator[None]:
    """Messages are stamped with the process's run id; a real runtime sets it."""
    with task_identity(node_id=0):
        yield


def _strategy(examples_dir: Path, downlink: str) -> FedLoraStrategy:
    cfg: RunConfig = load_config(
        examples_dir / "tiny.toml", ["privacy.mode=none", f"federation.downlink={downlink}"]
    )
    strategy = FedLoraStrategy(cfg, site_plan(cfg), FINGERPRINT, run_id="run")
    strategy.node_ids = list(NODES)
    return strategy


class StoreOnly:
    """The part of a site that rebuilds versions: its received versions, in memory."""

    def __init__(self) -> None:
        self.versions = ReceivedVersions(None)

    def received_versions(self, run_id: str) -> ReceivedVersions:
        return self.versions


def _evaluate(strategy: FedLoraStrategy, server_round: int, state: dict) -> list[Message]:  # type: ignore[type-arg]
    sent = list(strategy.configure_evaluate(server_round, ArrayRecord(state), ConfigRecord(), None))  # type: ignore[arg-type]
    for number, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"eval-{server_round}-{number}"
    return sent


def _eval_reply(instruction: Message, site: str) -> Message:
    metrics = {P.METRIC_EXAMPLES: 4, P.METRIC_EVAL_LOSS: 1.0, P.METRIC_EVAL_TOKENS: 10}
    content = RecordDict(
        {
            P.METRICS_RECORD: MetricRecord(metrics),  # type: ignore[arg-type]
            P.UPDATE_RECORD: ConfigRecord({P.KEY_SITE: site}),
        }
    )
    return Message(content, reply_to=instruction)


def _rebuild(message: Message, site: StoreOnly) -> dict[str, torch.Tensor]:
    header, _ = _header(message)
    return _global(message, site, header)  # type: ignore[arg-type]


def _forms(messages: list[Message]) -> dict[int, str]:
    return {
        m.metadata.dst_node_id: str(m.content.config_records[P.HEADER_RECORD][P.KEY_GLOBAL_FORM])
        for m in messages
    }


def test_sites_get_full_state_then_a_step_then_a_reference(examples_dir: Path) -> None:
    strategy = _strategy(examples_dir, "fp16")
    sites = {node: StoreOnly() for node in NODES}
    sent = _evaluate(strategy, 0, V0)  # round 0: nobody holds anything
    assert set(_forms(sent).values()) == {P.FORM_FULL}
    assert strategy.eval_log.bytes_down == 3 * FULL_BYTES
    for message in sent[:2]:  # nodes 1 and 2 evaluate v0; node 3 fails
        _rebuild(message, sites[message.metadata.dst_node_id])
    strategy.aggregate_evaluate(
        0,
        [
            _eval_reply(sent[0], "s1"),
            _eval_reply(sent[1], "s2"),
            Message(Error(code=1, reason="crashed"), reply_to=sent[2]),
        ],
    )
    # Round 1 trains on v0: a reference for those that confirmed it, full state for node 3.
    train = list(strategy.configure_train(1, ArrayRecord(V0), ConfigRecord(), None))  # type: ignore[arg-type]
    assert _forms(train) == {1: P.FORM_REFERENCE, 2: P.FORM_REFERENCE, 3: P.FORM_FULL}
    assert strategy.train_log.bytes_down == FULL_BYTES
    assert all(P.GLOBAL_RECORD not in m.content.array_records for m in train[:2])
    for message in train:
        rebuilt = _rebuild(message, sites[message.metadata.dst_node_id])
        assert state_sha256(rebuilt) == state_sha256(V0)
    for node in NODES:  # their train replies were accepted
        strategy.downlink.confirm(node, 0)
    # v1 is published as what the fp16 step rebuilds; every site gets that step.
    v1 = strategy.downlink.publish(1, V0, AGGREGATE)
    assert not torch.equal(v1["shared/a.lora_A.weight"], AGGREGATE["shared/a.lora_A.weight"])
    for key in V0:  # within fp16's precision of the step (2^-11 of |0.1| and |0.3|)
        torch.testing.assert_close(v1[key], AGGREGATE[key], rtol=0, atol=0.3 * 2.0**-11)
    strategy.version = 1
    sent = _evaluate(strategy, 1, v1)
    assert set(_forms(sent).values()) == {P.FORM_STEP}
    step_bytes = strategy.eval_log.bytes_down // 3
    assert step_bytes < 400  # a safetensors header and 16 fp16 values
    for message in sent:
        rebuilt = _rebuild(message, sites[message.metadata.dst_node_id])
        assert all(torch.equal(rebuilt[k], v1[k]) for k in v1)


def test_a_site_that_lost_its_copy_errs_and_then_gets_full_state(examples_dir: Path) -> None:
    strategy = _strategy(examples_dir, "fp16")
    strategy.downlink.confirm(1, 0)
    train = list(strategy.configure_train(1, ArrayRecord(V0), ConfigRecord(), None))  # type: ignore[arg-type]
    assert _forms(train)[1] == P.FORM_REFERENCE
    with pytest.raises(GlobalVersionMissing, match="does not hold"):
        _rebuild(train[0], StoreOnly())  # its store was wiped
    train[0].metadata.__dict__["_message_id"] = "train-1-0"
    error = Message(Error(code=1001, reason="does not hold v0000"), reply_to=train[0])
    with pytest.raises(Exception, match="valid replies"):
        strategy.aggregate_train(1, [error])
    again = list(strategy.configure_train(2, ArrayRecord(V0), ConfigRecord(), None))  # type: ignore[arg-type]
    assert _forms(again)[1] == P.FORM_FULL
    assert state_sha256(_rebuild(again[0], StoreOnly())) == state_sha256(V0)


def test_an_altered_digest_in_the_header_is_refused_by_the_site(examples_dir: Path) -> None:
    strategy = _strategy(examples_dir, "fp16")
    [message, *_] = _evaluate(strategy, 0, V0)
    message.content.config_records[P.HEADER_RECORD][P.KEY_GLOBAL_SHA256] = "0" * 64
    with pytest.raises(Exception, match="SHA-256"):
        _rebuild(message, StoreOnly())


def test_downlink_full_always_sends_the_state_and_publishes_the_aggregate() -> None:
    downlink = Downlink("full", 1 << 20)
    downlink.confirm(1, 0)
    assert downlink.form(1, 0) == P.FORM_FULL
    published = downlink.publish(1, V0, AGGREGATE)
    assert all(torch.equal(published[k], AGGREGATE[k]) for k in V0)


def test_a_step_is_only_sent_from_the_version_just_before() -> None:
    downlink = Downlink("int8", 1 << 20)
    downlink.publish(1, V0, AGGREGATE)
    downlink.confirm(1, 0)
    downlink.confirm(2, 1)
    assert (downlink.form(1, 1), downlink.form(2, 1), downlink.form(3, 1)) == (
        P.FORM_STEP,
        P.FORM_REFERENCE,
        P.FORM_FULL,
    )
    assert downlink.form(1, 2) == P.FORM_FULL  # v0 -> v2: no such step
    downlink.forget(2)
    assert downlink.form(2, 1) == P.FORM_FULL
