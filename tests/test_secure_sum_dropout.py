"""Secure-sum through real Flower simulation with 5 sites: dropouts after the share stage are
recovered; below the reconstruction threshold the round fails cleanly."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from client.app import SiteKeys, make_client_app
from common import protocol as P
from common.config import SecureSumConfig, load_config
from common.registry import Registry
from fedlora.in_process import run_in_process
from fedlora.simulate import provision_keys
from server.app import make_server_app
from server.federation import prepare
from tests.helpers.fixed_point_bound import mean_error_bound

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"
ONE_ROUND = ["federation.rounds=1", "data.partition='iid'"]


def dropping(inner: ClientApp, sites: Iterable[int], stage: str) -> ClientApp:
    """A ClientApp whose ``sites`` go silent (error reply) at ``stage``; the rest are honest."""
    app, silent = ClientApp(), set(sites)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        header = msg.content.config_records[P.HEADER_RECORD]
        if header.get(P.KEY_STAGE, P.STAGE_TRAIN) == stage and (
            int(context.node_config["partition-id"]) in silent
        ):
            return Message(Error(code=1002, reason="site went offline"), reply_to=msg)
        return inner(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


def run(
    out: Path, sites: int, overrides: list[str], drop: Iterable[int], stage: str
) -> dict[str, Any]:
    cfg = load_config(TINY, [*ONE_ROUND, f"federation.sites={sites}", *overrides])
    sealing, _ = provision_keys(cfg, out)
    coord = prepare(cfg, out, sealing)
    app = dropping(make_client_app(cfg, SiteKeys(out / "keys"), out / "sites"), drop, stage)
    run_in_process(make_server_app(coord), app, sites)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": metrics, "registry": Registry(out / "registry")}


# Shares go to a site's k neighbours and itself, t > (k + 1) / 2: with 5 sites (k = 4, t = 3)
# a survivor's b needs its own share and 2 neighbours', a dropped site's s_sk 3 survivors.
@pytest.mark.parametrize(("sites", "dropped"), [(5, (3,)), (5, (1, 4))])
def test_dropouts_after_sharing_are_recovered(
    tmp_path: Path, sites: int, dropped: tuple[int, ...]
) -> None:
    secure = run(tmp_path / "ss", sites, ["privacy.mode='secure-sum'"], dropped, P.STAGE_MASK)
    # The same survivors, aggregated in the clear (sealed) after the others dropped out.
    survivors = sites - len(dropped)
    sealed = run(
        tmp_path / "sealed", sites, [f"federation.min-sites={survivors}"], dropped, P.STAGE_TRAIN
    )
    line = secure["metrics"][1]
    assert "failed" not in line
    assert sorted(line["cohort"]) == sorted(sealed["metrics"][1]["cohort"])
    assert len(line["cohort"]) == survivors
    # From the fixed-point design (the default max-weight and clip-range), not from the bound
    # the run reports, which must not exceed it either.
    ss = SecureSumConfig()
    bound = mean_error_bound(sites, ss.max_weight, ss.clip_range, survivors)
    assert 0 < line["secure_sum_max_abs_error"] <= bound
    ours, plain = secure["registry"].load("shared", 1), sealed["registry"].load("shared", 1)
    v0 = sealed["registry"].load("shared", 0)
    for key in plain:  # + float32 rounding of the stored adapters (1e-7 here), + each run's
        # fp16 rounding of its published step (federation.downlink): 2^-11 of the step
        step = float((plain[key] - v0[key]).abs().max()) + bound
        assert float((ours[key] - plain[key]).abs().max()) <= bound + 2 * step * 2.0**-11 + 1e-7


def test_below_threshold_the_round_fails_and_the_version_stays(tmp_path: Path) -> None:
    # 3 of 5 drop: a dropped site's s_sk needs t = 3 surviving neighbours, only 2 are left.
    overrides = ["privacy.mode='secure-sum'", "federation.min-sites=2"]
    secure = run(tmp_path / "ss", 5, overrides, (0, 2, 4), P.STAGE_MASK)
    line = secure["metrics"][1]
    assert "failed" in line and line["version"] == 0
    # The two survivors see 2 of the 3 needed among their neighbours and themselves: they
    # refuse to confirm (before any share is revealed), and the failure says so.
    failed = str(line["failed"])
    assert "confirmed the survivor list" in failed, failed
    assert failed.count("refuses to confirm") == 2 and "floor of 3" in failed, failed
    assert [v.version for v in secure["registry"].versions("shared")] == [0]
    v0 = secure["registry"].load("shared", 0)
    assert v0 and all(torch.isfinite(t).all() for t in v0.values())
