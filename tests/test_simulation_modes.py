"""Aggregation rules, server optimizers, DP and enrollment through the real coordinator and site
apps, on the in-process simulation runtime (``tests/helpers/in_process.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from common.allow_list import add_site
from common.config import SecureSumConfig, load_config
from common.dp import PrivacyAccountant
from common.keys import generate_site_key, public_path_for
from common.registry import Registry
from fedlora.simulate import simulate
from server.checkpoint import load_checkpoint
from tests.helpers.fixed_point_bound import mean_error_bound
from tests.helpers.in_process import IN_PROCESS

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"


def run_tiny(out: Path, *overrides: str) -> dict[str, Any]:
    cfg = load_config(TINY, ["federation.rounds=2", IN_PROCESS, *overrides])
    summary = simulate(cfg, out)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    registry = Registry(out / "registry")
    return {"summary": summary, "metrics": metrics, "registry": registry, "out": out}


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_tiny(tmp_path_factory.mktemp("fedavg") / "run")


def _factors(state: dict[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if f"lora_{which}" in k}


def test_ffa_keeps_a_fixed_and_sends_half(tmp_path: Path, fedavg: dict[str, Any]) -> None:
    run = run_tiny(tmp_path / "run", "aggregation.rule='ffa'")
    v0, v2 = run["registry"].load("shared", 0), run["registry"].load("shared", 2)
    frozen = _factors(v0, "A")
    assert frozen and all(torch.equal(v0[k], v2[k]) for k in frozen)  # (an empty all() passes)
    assert any(not torch.equal(v0[k], v2[k]) for k in _factors(v0, "B"))
    ffa_up = run["metrics"][1]["bytes_up"]
    assert ffa_up < 0.6 * fedavg["metrics"][1]["bytes_up"]
    assert run["metrics"][-1]["eval_loss"] < run["metrics"][0]["eval_loss"]


@pytest.mark.parametrize(("encoding", "bound"), [("int8-block", 0.45), ("int4", 0.3)])
def test_block_encodings_through_a_sealed_simulation(
    tmp_path: Path, fedavg: dict[str, Any], encoding: str, bound: float
) -> None:
    """Sites quantise with per-block scales, the coordinator decodes and streams the sum; the
    tiny adapter's names and the envelopes weigh more than at SmolLM2 size (0.26 / 0.14)."""
    run = run_tiny(tmp_path / "run", f"privacy.encoding='{encoding}'")
    assert [v.version for v in run["registry"].versions("shared")] == [0, 1, 2]
    assert all(not m["rejected"] for m in run["metrics"])
    assert run["metrics"][1]["bytes_up"] < bound * fedavg["metrics"][1]["bytes_up"]
    assert run["metrics"][-1]["eval_loss"] < run["metrics"][0]["eval_loss"]
    assert abs(run["metrics"][-1]["eval_loss"] - fedavg["metrics"][-1]["eval_loss"]) < 0.05


def test_fedsa_keeps_b_at_the_sites(tmp_path: Path) -> None:
    run = run_tiny(tmp_path / "run", "aggregation.rule='fedsa'")
    v0, v2 = run["registry"].load("shared", 0), run["registry"].load("shared", 2)
    kept = _factors(v2, "B")
    assert kept and all(torch.equal(v2[k], torch.zeros_like(v2[k])) for k in kept)
    assert any(not torch.equal(v0[k], v2[k]) for k in _factors(v0, "A"))
    # Sites evaluate with their private B: their held-out loss improves.
    assert run["metrics"][-1]["eval_loss"] < run["metrics"][0]["eval_loss"]


def test_exact_rule_runs_in_sealed_mode(tmp_path: Path) -> None:
    run = run_tiny(tmp_path / "run", "aggregation.rule='exact'")
    assert run["registry"].get("shared").manifest["rule"] == "exact"
    assert run["metrics"][-1]["eval_loss"] < run["metrics"][0]["eval_loss"]


def test_fedadam_state_is_checkpointed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_tiny(out, "aggregation.server-optimizer='fedadam'", "aggregation.server-lr=0.01")
    ckpt = load_checkpoint(out)
    assert ckpt is not None
    assert any(k.startswith("optimizer/shared/m/") for k in ckpt.optimizer_tensors)
    assert ckpt.extra["aggregator"]["optimizers"]["shared"]["steps"] == 2


def test_dp_records_epsilon_and_stops_at_the_budget(tmp_path: Path) -> None:
    sigma, delta = 1.0, 1e-5
    budget = PrivacyAccountant(sigma, 1.0, delta).epsilon_after(2) * 1.001
    run = run_tiny(
        tmp_path / "run",
        "federation.rounds=4",
        "privacy.dp.enabled=true",
        "privacy.dp.clip=0.5",
        f"privacy.dp.noise-multiplier={sigma}",
        f"privacy.dp.epsilon-budget={budget}",
        "privacy.dp.seed=7",
    )
    assert run["summary"]["stopped"] and "budget" in run["summary"]["stopped"]
    assert [m["round"] for m in run["metrics"]] == [0, 1, 2]
    eps = [m["epsilon"] for m in run["metrics"][1:]]
    assert eps[0] < eps[1] <= budget
    manifest = run["registry"].get("shared").manifest
    assert manifest["epsilon"] == pytest.approx(eps[1])
    assert manifest["dp"]["clip"] == 0.5


def test_unenrolled_site_is_rejected(tmp_path: Path) -> None:
    out = tmp_path / "run"
    keys = out / "keys"
    allow = tmp_path / "allow-list.json"
    for site in ("site-0", "site-1", "site-2"):
        generate_site_key(keys, site)
    for site in ("site-0", "site-1"):  # site-2 has a key but was never enrolled
        add_site(allow, site, public_path_for(keys / f"{site}.key"))
    run = run_tiny(out, f"privacy.allow-list='{allow}'", "federation.min-sites=2")
    rejected = run["metrics"][1]["rejected"]
    # Its delta and its (sealed, signed) evaluation figures are both refused.
    assert [r["site"] for r in rejected] == ["site-2", "site-2"]
    assert all("not enrolled" in r["reason"] for r in rejected), rejected
    assert run["metrics"][1]["cohort"] == ["site-0", "site-1"]


def test_secure_sum_matches_sealed_within_its_error_bound(
    tmp_path: Path, fedavg: dict[str, Any]
) -> None:
    run = run_tiny(tmp_path / "run", "privacy.mode='secure-sum'")
    assert all(m["rejected"] == [] for m in run["metrics"])
    # The tolerance follows from the fixed-point design (3 sites, the default max-weight and
    # clip-range), not from the bound the run reports, which must not exceed it either.
    bound = mean_error_bound(3, SecureSumConfig().max_weight, SecureSumConfig().clip_range, 3)
    assert 0 < max(m["secure_sum_max_abs_error"] for m in run["metrics"][1:]) <= bound
    ours, plain = run["registry"].load("shared", 1), fedavg["registry"].load("shared", 1)
    v0 = fedavg["registry"].load("shared", 0)
    for key in plain:
        # one round of FedAvg: the mean delta differs by the fixed-point error (+ float32
        # rounding of the stored adapters, 1e-7 here); each run publishes v0 + its step
        # rounded to fp16 (federation.downlink), half an fp16 ulp: 2^-11 of the step, each
        step = float((plain[key] - v0[key]).abs().max()) + bound
        assert float((ours[key] - plain[key]).abs().max()) <= bound + 2 * step * 2.0**-11 + 1e-7
    assert run["registry"].get("shared").manifest["privacy"] == "secure-sum"


def test_the_downlink_sends_steps_and_references_not_the_state(
    tmp_path: Path, fedavg: dict[str, Any]
) -> None:
    """federation.downlink = fp16 (the default) against 'full': after round 0, a site's train
    instruction is a reference to the version it evaluated (0 bytes) and its evaluate
    instruction the fp16 step from the version it trained on. Every site checks the SHA-256 of
    what it rebuilt: a mismatch would be a rejected reply."""
    full = run_tiny(tmp_path / "run", "federation.downlink='full'")
    ours, theirs = fedavg["metrics"], full["metrics"]
    assert all(not m["rejected"] for m in ours + theirs)
    assert ours[0]["bytes_down"] == theirs[0]["bytes_down"] > 0  # v0: nobody holds anything
    for server_round in (1, 2):
        # 'full' sends the fp32 state twice (train, evaluate); fp16 one step of half the data
        # bytes (the tiny adapter's headers weigh more than SmolLM2's)
        one_full = theirs[server_round]["bytes_down"] / 2
        assert ours[server_round]["bytes_down"] < 0.6 * one_full
    assert abs(ours[-1]["eval_loss"] - theirs[-1]["eval_loss"]) < 0.05
    received = fedavg["out"] / "sites" / "site-0" / fedavg["summary"]["run_id"] / "received"
    held = sorted(p.name for p in received.iterdir())
    assert held == ["v0000.safetensors", "v0001.safetensors", "v0002.safetensors"], held


def test_secure_sum_with_distributed_dp(tmp_path: Path) -> None:
    run = run_tiny(
        tmp_path / "run",
        "privacy.mode='secure-sum'",
        "privacy.dp.enabled=true",
        "privacy.dp.placement='distributed'",
        "privacy.dp.clip=0.5",
        "privacy.dp.noise-multiplier=0.5",
    )
    assert [m["round"] for m in run["metrics"]] == [0, 1, 2]
    assert run["metrics"][2]["epsilon"] > run["metrics"][1]["epsilon"] > 0


def test_median_aggregation_with_server_clipping(tmp_path: Path) -> None:
    run = run_tiny(tmp_path / "run", "aggregation.robust='median'", "aggregation.server-clip=1.0")
    assert all(m["rejected"] == [] for m in run["metrics"])
    assert run["metrics"][-1]["eval_loss"] < run["metrics"][0]["eval_loss"]


def test_sites_evaluate_every_nth_round_and_the_last(tmp_path: Path) -> None:
    run = run_tiny(tmp_path / "run", "federation.rounds=3", "federation.evaluate-every=2")
    metrics = run["metrics"]
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    evaluated = [m["round"] for m in metrics if m["eval_loss"] is not None]
    assert evaluated == [0, 2, 3]
    trained_only = metrics[1]["sites"]
    assert len(trained_only) == 3 and all("evaluate" not in s for s in trained_only.values())
    assert len(metrics[1]["cohort"]) == 3 and metrics[1]["rejected"] == []  # round 1 trained


def test_secure_sum_advert_signed_by_another_key_never_takes_the_slot(tmp_path: Path) -> None:
    """Stage 1 checks each advert's signature before the reply takes its site's slot."""
    out = tmp_path / "run"
    keys = out / "keys"
    allow = tmp_path / "allow-list.json"
    for site in ("site-0", "site-1", "site-2"):
        add_site(allow, site, public_path_for(generate_site_key(keys, site)))
    for suffix in (".key", ".pub"):  # site-2 now signs with a key nobody enrolled
        (keys / f"site-2{suffix}").unlink()
    generate_site_key(keys, "site-2")
    run = run_tiny(
        out,
        "privacy.mode='secure-sum'",
        f"privacy.allow-list='{allow}'",
        "federation.min-sites=2",
        "federation.rounds=1",
    )
    rejected = run["metrics"][1]["rejected"]  # train stage first, then evaluate
    assert {r["site"] for r in rejected} == {"site-2"}, rejected
    assert "unsigned key advert" in rejected[0]["reason"], rejected
    assert "signature invalid" in rejected[1]["reason"], rejected  # its sealed eval report
    assert run["metrics"][1]["cohort"] == ["site-0", "site-1"]


def test_scaffold_control_variate_is_the_mean_of_the_sites_under_secure_sum(
    tmp_path: Path,
) -> None:
    """SCAFFOLD's c travels inside the masked sum: after the run it is the example-weighted
    mean of the c_i the sites keep in their stores, to the fixed-point error."""
    from safetensors.torch import load_file

    from client.drift import split_kept

    sgd = ["train.optimizer='sgd'", "train.lr=0.05"]
    run = run_tiny(tmp_path / "run", "privacy.mode='secure-sum'", "train.scaffold=true", *sgd)
    assert all(m["rejected"] == [] for m in run["metrics"])
    ckpt = load_checkpoint(run["out"])
    assert ckpt is not None
    c = {k.removeprefix("scaffold-c/"): v for k, v in ckpt.optimizer_tensors.items()
         if k.startswith("scaffold-c/")}  # fmt: skip
    assert c and all(v.abs().max() > 0 for v in c.values())
    kept = sorted(run["out"].glob("sites/site-*/*/kept/after-v0001.safetensors"))
    assert len(kept) == 3  # each site's c_i after training on version 1 (round 2)
    own = [split_kept(load_file(path))[1] for path in kept]
    assert all(set(o) == set(c) for o in own)
    bound = mean_error_bound(3, SecureSumConfig().max_weight, SecureSumConfig().clip_range, 3)
    for key, value in c.items():
        mean = torch.stack([o[key] for o in own]).mean(0)  # tiny's sites hold 40 examples each
        # Two rounds of summed changes, each off by at most the bound per coordinate.
        assert float((value - mean).abs().max()) <= 2 * bound + 1e-6, key
