"""Signed instructions and site policies through real Flower (simulation runtime, tiny model).

Three virtual sites, one round: site-0 is honest; every instruction to site-1 is altered on the
way (its plan switched to privacy mode ``none``, as an outsider or relay would to read plain
deltas); site-2's own policy demands DP noise that the run does not add. Sites 1 and 2 must
refuse before training, site-1 must send nothing in the clear, and the round must go on with
site-0 alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.app import SiteKeys, make_client_app
from common import protocol as P
from common.config import load_config
from common.envelope import MAGIC
from common.registry import Registry
from server.audit import AUDIT_FILE, EVENT_REPLY_REJECTED, read_entries
from server.federation import prepare, run_federation
from tests.helpers.recording import RecordingGrid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def downgrade_in_transit(msg: Message) -> None:
    """What a relay or an outsider on the path would do: switch the plan to plain deltas."""
    header = msg.content.config_records[P.HEADER_RECORD]
    plan = json.loads(str(header[P.KEY_PLAN]))
    plan["privacy-mode"] = "none"
    header[P.KEY_PLAN] = json.dumps(plan)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fedlora.in_process import run_in_process
    from fedlora.simulate import provision_keys

    out = tmp_path_factory.mktemp("signed")
    overrides = ["federation.rounds=1", "federation.min-sites=1", "train.local-steps=2"]
    cfg = load_config(REPO / "examples" / "tiny.toml", overrides)
    assert cfg.privacy.mode == "sealed" and not cfg.privacy.dp.enabled
    strict = cfg.model_copy(
        update={"site_policy": cfg.site_policy.model_copy(update={"min_noise_multiplier": 1.0})}
    )
    sealing, _ = provision_keys(cfg, out)
    keys = SiteKeys(out / "keys")
    honest = make_client_app(cfg, keys, out / "sites")
    demanding = make_client_app(strict, keys, out / "sites")
    coord = prepare(cfg, out, sealing)

    def route(msg: Message, context: Context) -> Message:
        site = int(context.node_config["partition-id"])
        if site == 1:
            downgrade_in_transit(msg)
        return (demanding if site == 2 else honest)(msg, context)

    clients = ClientApp()
    clients.train()(route)
    clients.evaluate()(route)
    server = ServerApp()
    box: dict[str, RecordingGrid] = {}

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        box["grid"] = RecordingGrid(grid)
        run_federation(box["grid"], coord)  # type: ignore[arg-type]

    run_in_process(server, clients, 3)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "metrics": metrics, "grid": box["grid"]}


def _refusals(out: Path) -> dict[str, set[str]]:
    """Refusal reasons the coordinator logged in round 1, by stage."""
    found: dict[str, set[str]] = {}
    for entry in read_entries(out / AUDIT_FILE):
        if entry["event"] == EVENT_REPLY_REJECTED and entry["round"] == 1:
            found.setdefault(entry["stage"], set()).add(entry["reason"])
    return found


def test_altered_instruction_is_refused_at_train_and_evaluate(run: dict[str, Any]) -> None:
    refusals = _refusals(run["out"])
    for stage in ("train", "evaluate"):
        assert any("does not verify" in reason for reason in refusals[stage]), refusals


def test_altered_instruction_gets_no_plain_delta(run: dict[str, Any]) -> None:
    """The downgraded site sends an error, never a delta in the clear."""
    for reply in run["grid"].received:
        if reply.has_content() and P.UPDATE_RECORD in reply.content.config_records:
            update = reply.content.config_records[P.UPDATE_RECORD]
            for key, value in update.items():
                if key.startswith(P.KEY_DELTA):
                    assert isinstance(value, bytes) and value.startswith(MAGIC)  # sealed only
    errors = [r for r in run["grid"].received if not r.has_content()]
    assert len(errors) >= 4  # sites 1 and 2, at train and at evaluate


def test_plan_below_the_site_policy_is_refused_naming_the_key(run: dict[str, Any]) -> None:
    refusals = _refusals(run["out"])
    for stage in ("train", "evaluate"):
        assert any("policy.min-noise-multiplier = 1.0" in r for r in refusals[stage]), refusals


def test_round_goes_on_with_the_honest_site(run: dict[str, Any]) -> None:
    last = run["metrics"][-1]
    assert last["round"] == 1
    assert last["cohort"] == ["site-0"]
    assert Registry(run["out"] / "registry").latest("shared").version == 1  # type: ignore[union-attr]
