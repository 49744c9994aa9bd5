"""The strategy's reply validation: each bad reply is rejected with a reason, the rest aggregate.

Replies are built as Flower Messages by hand (a unit test of ``aggregate_train``); the real path
through the simulation runtime is in ``tests/test_simulation.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common import protocol as P
from common.adapters import AggregationError
from common.config import RunConfig, load_config, site_plan
from common.encoding import Encoding, encode_delta
from server.aggregate import Aggregator
from server.strategy import FedLoraStrategy
from tests.helpers.flower_identity import task_identity

FINGERPRINT = "f" * 64
# The global state travels as ``<module>/<key>``; each module's delta payload is un-prefixed.
GLOBAL = {"shared/a.lora_A.weight": torch.ones(2, 4), "shared/a.lora_B.weight": torch.zeros(4, 2)}


@pytest.fixture(autouse=True)
def stamped_messages() -> Iterator[None]:
    """Messages are stamped with the process's run id; a real runtime sets it."""
    with task_identity(node_id=0):
        yield


@pytest.fixture
def strategy(examples_dir: Path) -> FedLoraStrategy:
    cfg: RunConfig = load_config(
        examples_dir / "tiny.toml",
        ["federation.min-sites=1", "aggregation.max-examples=1000", "privacy.mode=none"],
    )
    strategy = FedLoraStrategy(cfg, site_plan(cfg), FINGERPRINT, run_id="run")
    strategy.node_ids = list(range(1, 20))
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), None))  # type: ignore[arg-type]
    return strategy


def _delta(value: float) -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.full((2, 4), value), "a.lora_B.weight": torch.zeros(4, 2)}


def reply(
    site: str,
    delta: bytes | dict[str, torch.Tensor] | None = None,
    /,
    examples: int = 10,
    **overrides: object,
) -> Message:
    instruction = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    payload = (
        encode_delta(_delta(1.0) if delta is None else delta)
        if not isinstance(delta, bytes)
        else delta
    )
    update: dict[str, object] = {
        P.KEY_SITE: site,
        P.KEY_FINGERPRINT: FINGERPRINT,
        P.KEY_ROUND: 1,
        P.KEY_VERSION: 0,
        P.KEY_ENCODING: "fp32",
        P.delta_key("shared"): payload,
    }
    update.update(overrides)
    content = RecordDict(
        {
            P.UPDATE_RECORD: ConfigRecord(update),  # type: ignore[arg-type]
            P.METRICS_RECORD: MetricRecord({P.METRIC_EXAMPLES: examples, P.METRIC_TRAIN_LOSS: 1.0}),
        }
    )
    return Message(content, reply_to=instruction)


def test_good_replies_are_weighted_by_examples(strategy: FedLoraStrategy) -> None:
    arrays, metrics = strategy.aggregate_train(
        1, [reply("s1", _delta(1.0), examples=10), reply("s2", _delta(4.0), examples=30)]
    )
    assert arrays is not None and metrics is not None
    new = arrays.to_torch_state_dict()
    torch.testing.assert_close(new["shared/a.lora_A.weight"], torch.full((2, 4), 1.0 + 3.25))
    assert strategy.train_log.rejected == []
    assert strategy.train_log.bytes_up > 0


def _nan_delta() -> dict[str, torch.Tensor]:
    delta = _delta(1.0)
    delta["a.lora_A.weight"][0, 0] = float("nan")
    return delta


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: reply("x", **{P.KEY_FINGERPRINT: "0" * 64}), "base fingerprint"),
        (lambda: reply("x", **{P.KEY_ROUND: 7}), "expected 1 / 0"),
        (lambda: reply("x", **{P.KEY_VERSION: 3}), "expected 1 / 0"),
        (lambda: reply("x", examples=10**9), "aggregation.max-examples"),
        (lambda: reply("x", examples=0), "example count"),
        (lambda: reply("x", b"garbage that is not safetensors"), "malformed"),
        (lambda: reply("x", b"\x00" * 3), "delta"),
        (
            lambda: reply(
                "x", {"a.lora_A.weight": torch.ones(3, 4), "a.lora_B.weight": torch.zeros(4, 2)}
            ),
            "shape",
        ),
        (lambda: reply("x", {"a.lora_A.weight": torch.ones(2, 4)}), "a.lora_B.weight"),
        (lambda: reply("x", **{P.delta_key("shared"): "not bytes"}), "not bytes"),
        (lambda: reply("x", b"\x00" * (300 * 1024 * 1024)), "privacy.max-payload-bytes"),
    ],
)
def test_bad_reply_is_rejected_and_round_goes_on(
    strategy: FedLoraStrategy, bad: object, reason: str
) -> None:
    arrays, _ = strategy.aggregate_train(1, [reply("good", _delta(2.0)), bad()])  # type: ignore[operator]
    assert arrays is not None
    torch.testing.assert_close(
        arrays.to_torch_state_dict()["shared/a.lora_A.weight"], torch.full((2, 4), 3.0)
    )
    assert len(strategy.train_log.rejected) == 1
    assert reason in strategy.train_log.rejected[0]["reason"]
    assert list(strategy.train_log.accepted) == ["good"]


def test_nan_delta_is_rejected(strategy: FedLoraStrategy) -> None:
    payload = encode_delta(_delta(1.0))
    # Write a NaN into the first float of the payload's data section after encoding.
    header = int.from_bytes(payload[:8], "little")
    start = 8 + header
    tampered = payload[:start] + b"\x00\x00\xc0\x7f" + payload[start + 4 :]
    strategy.aggregate_train(1, [reply("good"), reply("x", tampered)])
    assert "non-finite" in strategy.train_log.rejected[0]["reason"].lower() or "nan" in (
        strategy.train_log.rejected[0]["reason"].lower()
    )


def test_error_reply_and_duplicate_site_are_rejected(strategy: FedLoraStrategy) -> None:
    instruction = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    error = Message(Error(code=1001, reason="fingerprint mismatch at site-9"), reply_to=instruction)
    strategy.aggregate_train(1, [reply("s1"), reply("s1", _delta(9.0)), error])
    reasons = [r["reason"] for r in strategy.train_log.rejected]
    assert any("same site" in r for r in reasons)
    assert any("fingerprint mismatch at site-9" in r for r in reasons)
    assert list(strategy.train_log.accepted) == ["s1"]


def _random_delta(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.lora_A.weight": torch.randn(2, 4, generator=gen) * 10.0 ** (seed % 5 - 3),
        "a.lora_B.weight": torch.randn(4, 2, generator=gen),
    }


def _mixed_round(keys: tuple[str, ...]) -> list[Message]:
    """Replies out of site order, in every encoding, with a rejected one (a wrong shape)."""

    def payload(seed: int, encoding: Encoding) -> bytes:
        return encode_delta({k: v for k, v in _random_delta(seed).items() if k in keys}, encoding)

    wrong = {k: torch.ones(5, 5) for k in keys}
    return [
        reply("s3", payload(3, "fp16"), examples=7),
        reply("s1", payload(1, "int8-block"), examples=11),
        reply("bad", encode_delta(wrong), examples=999),
        reply("s4", payload(4, "int4"), examples=5),
        reply("s2", payload(2, "fp32"), examples=13),
    ]


@pytest.mark.parametrize(
    ("rule", "keys"),
    [("fedavg", ("a.lora_A.weight", "a.lora_B.weight")), ("ffa", ("a.lora_B.weight",))],
)
def test_streamed_round_is_bit_identical_to_the_list_round(
    examples_dir: Path, monkeypatch: pytest.MonkeyPatch, rule: str, keys: tuple[str, ...]
) -> None:
    """The coordinator's streamed sum (payloads decoded one at a time after validation) gives
    exactly the new global of the list path; the rejected reply touches neither."""

    def run() -> dict[str, torch.Tensor]:
        cfg = load_config(
            examples_dir / "tiny.toml",
            ["federation.min-sites=1", "privacy.mode=none", f"aggregation.rule='{rule}'"],
        )
        strategy = FedLoraStrategy(cfg, site_plan(cfg), FINGERPRINT, run_id="run")
        strategy.node_ids = list(range(1, 20))
        list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), None))  # type: ignore[arg-type]
        arrays, _ = strategy.aggregate_train(1, _mixed_round(keys))
        assert [r["site"] for r in strategy.train_log.rejected] == ["bad"]
        assert arrays is not None
        return arrays.to_torch_state_dict()

    def never(*args: object) -> None:
        raise AssertionError("a sum-only round must not take the list path")

    assert Aggregator(load_config(examples_dir / "tiny.toml")).streams
    with monkeypatch.context() as patch:
        patch.setattr(Aggregator, "aggregate", never)
        streamed = run()
    monkeypatch.setattr(Aggregator, "streams", property(lambda self: False))
    listed = run()
    assert list(streamed) == list(listed)
    for key in listed:
        assert torch.equal(streamed[key], listed[key]), key
    assert not torch.equal(streamed["shared/a.lora_B.weight"], GLOBAL["shared/a.lora_B.weight"])


def test_too_few_valid_replies_is_an_aggregation_error(examples_dir: Path) -> None:
    cfg = load_config(examples_dir / "tiny.toml", ["privacy.mode=none"])  # min-sites: all 3
    strategy = FedLoraStrategy(cfg, site_plan(cfg), FINGERPRINT, run_id="run")
    strategy.node_ids = [1, 2, 3]
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), None))  # type: ignore[arg-type]
    with pytest.raises(AggregationError, match="min-sites"):
        strategy.aggregate_train(1, [reply("s1"), reply("s2", **{P.KEY_ROUND: 5})])


def test_delta_norm_over_the_bound_is_rejected(examples_dir: Path) -> None:
    cfg = load_config(
        examples_dir / "tiny.toml",
        ["privacy.mode=none", "federation.min-sites=1", "aggregation.max-delta-norm=10.0"],
    )
    strategy = FedLoraStrategy(cfg, site_plan(cfg), FINGERPRINT, run_id="run")
    strategy.node_ids = [1, 2]
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), None))  # type: ignore[arg-type]
    strategy.aggregate_train(1, [reply("good", _delta(1.0)), reply("big", _delta(100.0))])
    assert [r["site"] for r in strategy.train_log.rejected] == ["big"]
    assert "norm" in strategy.train_log.rejected[0]["reason"]


def test_repeat_offender_is_quarantined(examples_dir: Path) -> None:
    cfg = load_config(
        examples_dir / "tiny.toml",
        ["privacy.mode=none", "federation.min-sites=1", "federation.quarantine-after=2"],
    )
    strategy = FedLoraStrategy(cfg, site_plan(cfg), FINGERPRINT, run_id="run")
    strategy.node_ids = [1, 2]
    for server_round in (1, 2):
        list(strategy.configure_train(server_round, ArrayRecord(GLOBAL), ConfigRecord(), None))  # type: ignore[arg-type]
        bad = reply("x", b"garbage")  # from node 1 (reply() addresses instruction to node 1)
        strategy.aggregate_train(server_round, [reply("good", **{P.KEY_ROUND: server_round}), bad])
    assert strategy.node_ids == [2]
    assert strategy.quarantined == {1: "x"}


def test_superlink_error_reply_names_the_unreachable_site(strategy: FedLoraStrategy) -> None:
    # Instructions as the grid sent them (it sets the message ids) to nodes 1 and 5.
    strategy.node_ids = [1, 5]
    sent = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), None))  # type: ignore[arg-type]
    for number, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"instruction-{number}"
    good = Message(reply("s5").content, reply_to=sent[1])
    strategy.aggregate_train(1, [good])
    assert strategy.node_sites == {5: "s5"}
    # Node 5 stops heartbeating: the SuperLink (node 1) answers its next instruction itself.
    strategy.train_log = type(strategy.train_log)()
    dead = Message(Error(code=5, reason="Node Unavailable"), reply_to=sent[1])
    dead.metadata.__dict__["_src_node_id"] = 1
    assert dead.metadata.src_node_id == 1
    with pytest.raises(AggregationError):
        strategy.aggregate_train(1, [dead])
    assert strategy.train_log.rejected == [
        {"site": "s5", "reason": "site reported an error: Node Unavailable"},
        {"site": "node-1", "reason": "no reply within federation.round-timeout = 3600 s"},
    ]  # node 1 was instructed too (sent[0]) and did not answer
    assert strategy.offences == {}  # a crash is no offence: the site may rejoin
    stranger = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    assert strategy._site_of(Message(Error(code=1), reply_to=stranger), 7) == "node-7"
    # A node known only from its (unsigned) evaluate reply is named as a claim.
    strategy.node_claims[7] = "s7"
    assert strategy._site_of(Message(Error(code=1), reply_to=stranger), 7) == "node-7 (claims s7)"


def test_a_node_that_does_not_answer_in_time_is_recorded(strategy: FedLoraStrategy) -> None:
    strategy.node_ids = [1, 5]
    sent = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), None))  # type: ignore[arg-type]
    for number, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"instruction-{number}"
    strategy.node_sites[5] = "s5"
    # The grid gave up waiting for node 5 (its instruction was sent[1]): only node 1 answered.
    strategy.aggregate_train(1, [Message(reply("s1").content, reply_to=sent[0])])
    assert list(strategy.train_log.accepted) == ["s1"]
    timeout = strategy.cfg.federation.round_timeout
    assert strategy.train_log.rejected == [
        {"site": "s5", "reason": f"no reply within federation.round-timeout = {timeout:g} s"}
    ]
    assert strategy.offences == {}  # a slow site is no offender
    list(strategy.configure_evaluate(1, ArrayRecord(GLOBAL), ConfigRecord(), None))  # type: ignore[arg-type]
    assert strategy.aggregate_evaluate(1, []) is None
    assert [r["site"] for r in strategy.eval_log.rejected] == []  # no ids: nothing was sent


@pytest.fixture
def modular(examples_dir: Path) -> FedLoraStrategy:
    """Modules shared, qa (group of s1 and s2) and style (private)."""
    cfg = load_config(
        examples_dir / "tiny.toml",
        [
            "federation.min-sites=1",
            "privacy.mode=none",
            "modules.style.scope='private'",
            "modules.qa.scope='group:qa'",
            "groups.qa=['s1', 's2']",
        ],
    )
    strategy = FedLoraStrategy(cfg, site_plan(cfg), FINGERPRINT, run_id="run")
    strategy.node_ids = list(range(1, 20))
    qa = {f"qa/{k.split('/', 1)[1]}": v for k, v in GLOBAL.items()}
    list(strategy.configure_train(1, ArrayRecord({**GLOBAL, **qa}), ConfigRecord(), None))  # type: ignore[arg-type]
    return strategy


@pytest.mark.parametrize(
    ("site", "modules", "reason"),
    [
        ("s1", ["shared"], "lacks the delta of module(s) ['qa']"),
        ("s3", ["qa", "shared"], "'qa' (group:qa) aggregates over its group, and s3 is not in it"),
        ("s1", ["qa", "shared", "style"], "'style' is private and must never leave a site"),
        ("s1", ["qa", "shared", "nope"], "unknown module 'nope'"),
    ],
)
def test_a_reply_with_the_wrong_modules_is_rejected(
    modular: FedLoraStrategy, site: str, modules: list[str], reason: str
) -> None:
    payloads = {P.delta_key(m): encode_delta(_delta(1.0)) for m in modules}
    good = {P.delta_key(m): encode_delta(_delta(2.0)) for m in ("qa", "shared")}
    bad = reply(site, **{P.delta_key("shared"): b"", **payloads})
    if "shared" not in modules:
        del bad.content.config_records[P.UPDATE_RECORD][P.delta_key("shared")]
    arrays, _ = modular.aggregate_train(1, [reply("s2", **good), bad])
    assert arrays is not None
    (rejected,) = modular.train_log.rejected
    assert reason in rejected["reason"]
    new = arrays.to_torch_state_dict()
    for module in ("qa", "shared"):  # the honest site alone moved both
        torch.testing.assert_close(new[f"{module}/a.lora_A.weight"], torch.full((2, 4), 3.0))


def test_a_group_module_moves_with_its_group_only(modular: FedLoraStrategy) -> None:
    s1 = {P.delta_key(m): encode_delta(_delta(1.0)) for m in ("qa", "shared")}
    s3 = {P.delta_key("shared"): encode_delta(_delta(4.0))}  # not in group qa
    arrays, _ = modular.aggregate_train(1, [reply("s1", **s1), reply("s3", **s3)])
    assert arrays is not None and modular.train_log.rejected == []
    new = arrays.to_torch_state_dict()
    torch.testing.assert_close(new["shared/a.lora_A.weight"], torch.full((2, 4), 1.0 + 2.5))
    torch.testing.assert_close(new["qa/a.lora_A.weight"], torch.full((2, 4), 2.0))
