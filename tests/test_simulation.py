"""End to end through real Flower: examples/tiny.toml in the simulation runtime (Ray), with
every message between coordinator and sites captured for inspection.

The same run on the in-process runtime (``fedlora/in_process.py``) publishes the same
versions bit for bit: the tests that run their federations there (most of the suite) test
what Ray would run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from peft import PeftModel

from client.app import SiteKeys, make_client_app
from common import protocol as P
from common.adapters import AdapterState, aggregate_fedavg, apply_delta
from common.config import RunConfig, load_config
from common.encoding import decode_delta
from common.errors import UpdateRejected
from common.fingerprint import fingerprint
from common.models import load_base
from common.registry import Registry
from fedlora.in_process import run_in_process
from server.app import make_server_app
from server.audit import AUDIT_FILE, EVENT_REPLY_REJECTED, read_entries
from server.federation import prepare
from tests.helpers.recording import RecordingGrid, open_envelope, payload_bytes, simulate_recorded

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CANARY = "CANARY-7f3a9c-do-not-leak"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("tiny")
    data = work / "dolly-tiny.jsonl"
    repo = Path(__file__).resolve().parent.parent
    shutil.copy(repo / "examples" / "data" / "dolly-tiny.jsonl", data)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["response"] = f"{rows[0]['response']} {CANARY}"
    rows[0]["instruction"] = f"{CANARY} {rows[0]['instruction']}"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(repo / "examples" / "tiny.toml", [f"data.path='{data}'"])
    assert cfg.privacy.mode == "sealed"  # the default and the example's setting
    return simulate_recorded(cfg, work / "out")


def test_every_round_recorded_and_published(run: dict[str, Any]) -> None:
    cfg: RunConfig = run["cfg"]
    metrics = run["metrics"]
    assert [m["round"] for m in metrics] == list(range(cfg.federation.rounds + 1))
    assert all(m["rejected"] == [] for m in metrics)
    assert all(len(m["cohort"]) == 3 for m in metrics[1:])
    registry = Registry(run["out"] / "registry")
    assert [v.version for v in registry.versions("shared")] == list(
        range(cfg.federation.rounds + 1)
    )
    summary = json.loads((run["out"] / "summary.json").read_text())
    assert summary["final_version"] == cfg.federation.rounds


def test_audit_log_carries_macs_under_the_coordinator_key(run: dict[str, Any]) -> None:
    from common.keys import load_coordinator_private
    from server.audit import AUDIT_FILE, MAC_FIELD, audit_mac_key, read_entries, verify_chain

    audit = run["out"] / AUDIT_FILE
    key = load_coordinator_private(run["out"] / "keys" / "coordinator.key")
    assert all(MAC_FIELD in entry for entry in read_entries(audit))
    assert verify_chain(audit, audit_mac_key(key.secret_bytes())) == []


def test_training_loss_falls(run: dict[str, Any]) -> None:
    metrics = run["metrics"]
    assert metrics[-1]["train_loss"] < metrics[1]["train_loss"]
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]


def test_bytes_are_counted(run: dict[str, Any]) -> None:
    grid: RecordingGrid = run["grid"]
    up = sum(
        len(m.content.config_records[P.UPDATE_RECORD][P.delta_key("shared")])  # type: ignore[arg-type]
        for m in grid.received
        if m.has_content()
        and P.delta_key("shared") in m.content.config_records.get(P.UPDATE_RECORD, {})
    )
    assert up == sum(m["bytes_up"] for m in run["metrics"]) > 0


def _open(run: dict[str, Any], reply: Message, module: str = "shared") -> bytes:
    return open_envelope(run["coord"], reply, module)


def test_no_plaintext_delta_on_the_wire(run: dict[str, Any]) -> None:
    grid: RecordingGrid = run["grid"]
    replies = [
        m
        for m in grid.received
        if m.has_content()
        and P.delta_key("shared") in m.content.config_records.get(P.UPDATE_RECORD, {})
    ]
    assert len(replies) == 3 * run["cfg"].federation.rounds
    for reply in replies:
        envelope = reply.content.config_records[P.UPDATE_RECORD][P.delta_key("shared")]
        assert isinstance(envelope, bytes)
        with pytest.raises(UpdateRejected):
            decode_delta(envelope, 1 << 30)  # not a readable delta without the key
        plaintext = _open(run, reply)
        # No 16-byte window of the plaintext's tensor data appears in the envelope.
        header = int.from_bytes(plaintext[:8], "little")
        data = plaintext[8 + header :]
        for start in range(0, len(data) - 16, 997):
            assert data[start : start + 16] not in envelope


def test_no_per_site_figure_travels_in_the_clear(run: dict[str, Any]) -> None:
    """Train and evaluate figures (loss, example count, clip scale, accuracy) are sealed and
    signed; the coordinator opens them, and metrics.jsonl still has them per site."""
    grid: RecordingGrid = run["grid"]
    replies = [m for m in grid.received if m.has_content()]
    evaluate = [m for m in replies if P.delta_key("shared") not in _update(m)]
    assert len(evaluate) == 3 * (run["cfg"].federation.rounds + 1)
    for reply in replies:
        assert not reply.content.metric_records, reply.content.metric_records
    for reply in evaluate:
        figures = P.parse_report(
            _open(run, reply, P.EVAL_REPORT_MODULE), P.EVAL_REPORT_KEYS, P.EVAL_REPORT_OPTIONAL
        )
        assert figures[P.METRIC_EVAL_LOSS] > 0
    last = run["metrics"][-1]["sites"]
    assert all(last[s]["evaluate"]["eval_loss"] > 0 and last[s]["train"]["steps"] for s in last)


def _update(reply: Message) -> ConfigRecord:
    return reply.content.config_records.get(P.UPDATE_RECORD, ConfigRecord())


def test_delta_not_state_travels_and_aggregate_is_fedavg(run: dict[str, Any]) -> None:
    grid: RecordingGrid = run["grid"]
    registry = Registry(run["out"] / "registry")
    global_v0 = registry.load("shared", 0)
    round1 = [
        m
        for m in grid.received
        if m.has_content()
        and P.UPDATE_RECORD in m.content.config_records
        and m.content.config_records[P.UPDATE_RECORD].get(P.KEY_ROUND) == 1
        and P.delta_key("shared") in m.content.config_records[P.UPDATE_RECORD]
    ]
    assert len(round1) == 3
    deltas: list[AdapterState] = []
    weights: list[float] = []
    for reply in round1:
        delta = decode_delta(_open(run, reply), 1 << 30)
        assert set(delta) == set(global_v0)
        for key, value in delta.items():
            if "lora_A" in key:  # A starts random: a full state would be as large as A itself
                assert value.norm() < 0.5 * global_v0[key].norm(), key
        deltas.append(delta)
        # The weight comes from the site's sealed report; nothing per site travels in the clear.
        assert P.METRICS_RECORD not in reply.content.metric_records
        report = P.parse_report(_open(run, reply, P.REPORT_MODULE))
        weights.append(float(report[P.METRIC_EXAMPLES]))
    expected = apply_delta(global_v0, aggregate_fedavg(deltas, weights))
    actual = registry.load("shared", 1)
    assert run["cfg"].federation.downlink == "fp16"
    for key in expected:
        # v1 is published as v0 + the fp16-rounded step (federation.downlink, common.downlink):
        # within half an fp16 ulp of each step element, 2^-11 of it, plus float32 rounding.
        step = (expected[key] - global_v0[key]).abs()
        error = (actual[key] - expected[key]).abs()
        assert bool((error <= step * 2.0**-11 + 1e-6 * expected[key].abs() + 1e-7).all()), key


def test_canary_never_travels(run: dict[str, Any]) -> None:
    grid: RecordingGrid = run["grid"]
    assert grid.sent and grid.received
    for message in [*grid.sent, *grid.received]:
        assert CANARY.encode() not in payload_bytes(message)


def test_registry_loads_in_peft_with_identical_logits(run: dict[str, Any]) -> None:
    cfg: RunConfig = run["cfg"]
    out: Path = run["out"]
    last = Registry(out / "registry").latest("shared")
    assert last is not None
    assert last.manifest["base_fingerprint"] == run["coord"].host.base.fingerprint
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    # fedlora's own model with the version's weights
    coord = run["coord"]
    from common.adapter_host import load_adapter_state

    load_adapter_state(
        coord.host.model, Registry(out / "registry").load("shared", last.version), "shared"
    )
    ours = coord.host.model(input_ids=ids).logits
    # a fresh base + stock peft loading of the registry folder
    base = load_base(cfg.model).model
    theirs = PeftModel.from_pretrained(base, str(last.path)).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # and the adapter changes the output (it is not a no-op)
    assert not torch.equal(ours, load_base(cfg.model).model(input_ids=ids).logits)


def test_base_fingerprint_unchanged_by_training(run: dict[str, Any]) -> None:
    coord = run["coord"]
    assert fingerprint(coord.host.model, coord.host.base.tokenizer) == coord.host.base.fingerprint


def test_site_with_foreign_base_refuses_and_round_goes_on(tmp_path: Path) -> None:
    """Site 2 runs a different base (another seed); it refuses, the others aggregate."""
    from fedlora.simulate import provision_keys

    repo = Path(__file__).resolve().parent.parent
    overrides = ["federation.rounds=1", "federation.min-sites=2"]
    cfg = load_config(repo / "examples" / "tiny.toml", overrides)
    foreign = load_config(repo / "examples" / "tiny.toml", [*overrides, "model.seed=1"])
    sealing, _ = provision_keys(cfg, tmp_path)
    keys = SiteKeys(tmp_path / "keys")
    sites = tmp_path / "sites"
    honest, impostor = make_client_app(cfg, keys, sites), make_client_app(foreign, keys, sites)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = int(context.node_config["partition-id"])
        return (impostor if site == 2 else honest)(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = int(context.node_config["partition-id"])
        return (impostor if site == 2 else honest)(msg, context)

    coord = prepare(cfg, tmp_path, sealing)
    run_in_process(make_server_app(coord), app, 3)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["cohort"] == ["site-0", "site-1"]
    reasons = [r["reason"] for r in metrics[1]["rejected"]]
    assert any(coord.host.base.fingerprint in r for r in reasons), reasons
    # The site itself refuses at each stage, before it trains or evaluates on a foreign base
    # (a site that skipped its check on train would be caught only by the coordinator).
    refused = {
        e["stage"]  # named by its node: an error reply claims no site
        for e in read_entries(tmp_path / AUDIT_FILE)
        if e["event"] == EVENT_REPLY_REJECTED
        and e["round"] == 1
        and "fingerprint mismatch at site-2" in e["reason"]
    }
    assert refused == {"train", "evaluate"}, refused
    assert Registry(tmp_path / "registry").latest("shared").version == 1  # type: ignore[union-attr]


def test_the_in_process_runtime_publishes_what_ray_publishes(
    run: dict[str, Any], tmp_path: Path
) -> None:
    """The run of the fixture again, on the in-process runtime: every version of every round
    holds the same tensors, every round the same losses, bytes and cohort, and the same
    instructions cross."""
    ray_cfg: RunConfig = run["cfg"]
    assert ray_cfg.simulation.backend == "ray"
    cfg = ray_cfg.model_copy(
        update={"simulation": ray_cfg.simulation.model_copy(update={"backend": "in-process"})}
    )
    other = simulate_recorded(cfg, tmp_path / "out")
    ray_registry, registry = Registry(run["out"] / "registry"), Registry(other["out"] / "registry")
    versions = [v.version for v in ray_registry.versions("shared")]
    assert versions == [v.version for v in registry.versions("shared")] == [0, 1, 2, 3]
    for version in versions:
        ray_state, state = ray_registry.load("shared", version), registry.load("shared", version)
        assert ray_state.keys() == state.keys()
        assert all(torch.equal(ray_state[k], state[k]) for k in state), version

    def figures(metrics: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        keys = ("round", "eval_loss", "train_loss", "bytes_up", "bytes_down", "cohort")
        return [tuple(m.get(k) for k in keys) for m in metrics]

    assert figures(other["metrics"]) == figures(run["metrics"])

    def traffic(grid: RecordingGrid) -> tuple[list[str], int]:
        """Instructions by type (in order), and how many replies carried an error."""
        return [m.metadata.message_type for m in grid.sent], sum(
            m.has_error() for m in grid.received
        )

    assert traffic(other["grid"]) == traffic(run["grid"])
