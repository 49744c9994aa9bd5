"""A site's policy against the plans it receives (``common.site_policy``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from common import protocol as P
from common.config import SitePlan, SitePolicy, load_config, site_plan
from common.dp import rdp_epsilon, site_noise_std
from common.site_config import load_site_config
from common.site_policy import PolicyRefused, check_plan

REPO = Path(__file__).resolve().parents[2]


def _plan(*overrides: str) -> SitePlan:
    return site_plan(load_config(REPO / "examples" / "tiny.toml", list(overrides)))


DP = ["privacy.dp.enabled=true", "privacy.dp.noise-multiplier=1.0", "privacy.dp.clip=0.5"]
DISTRIBUTED = [*DP, "privacy.mode='secure-sum'", "privacy.dp.placement='distributed'"]


def _header(server_round: int = 1, threshold: int | None = None) -> ConfigRecord:
    header = ConfigRecord({P.KEY_ROUND: server_round})
    if threshold is not None:
        header[P.KEY_SECAGG_PARAMS] = json.dumps({"threshold": threshold})
    return header


def test_deployed_default_refuses_plain_deltas_and_accepts_sealed() -> None:
    check_plan(SitePolicy(), _plan(), _header())
    with pytest.raises(PolicyRefused, match=r"policy.privacy-modes = \['sealed', 'secure-sum'\]"):
        check_plan(SitePolicy(), _plan("privacy.mode='none'"), _header())


def test_site_toml_without_policy_gets_the_deployed_default() -> None:
    cfg = load_site_config(REPO / "examples" / "site.toml")
    assert cfg.policy == SitePolicy()
    assert "none" not in cfg.policy.privacy_modes


def test_simulation_default_accepts_every_mode() -> None:
    cfg = load_config(REPO / "examples" / "tiny.toml", ["privacy.mode='none'"])
    check_plan(cfg.site_policy, site_plan(cfg), _header())


def test_min_noise_multiplier_needs_dp_and_enough_noise() -> None:
    policy = SitePolicy(min_noise_multiplier=1.0)
    with pytest.raises(PolicyRefused, match=r"min-noise-multiplier = 1\.0.*no DP"):
        check_plan(policy, _plan(), _header())
    check_plan(policy, _plan(*DP), _header())
    weak = _plan(*DP[:1], "privacy.dp.noise-multiplier=0.5")
    with pytest.raises(PolicyRefused, match=r"min-noise-multiplier = 1\.0, but the plan has 0\.5"):
        check_plan(policy, weak, _header())


def test_distributed_noise_share_is_checked_against_the_threshold() -> None:
    """A plan that declares sigma but sends a smaller per-site share is refused."""
    plan = _plan(*DISTRIBUTED)
    own = site_noise_std(1.0, 0.5, "distributed", 2)
    assert plan.site_noise_std == pytest.approx(own)  # tiny: 3 sites, threshold 2
    check_plan(SitePolicy(), plan, _header(threshold=2))
    short = plan.model_copy(update={"site_noise_std": own * 0.9})
    with pytest.raises(PolicyRefused, match="site-noise-std"):
        check_plan(SitePolicy(), short, _header(threshold=2))
    # Sized for 2 survivors: a header claiming a threshold of 3 (more survivors) accepts it,
    # one that lets a round complete with fewer would not.
    check_plan(SitePolicy(), short, _header(threshold=3))


def test_dp_placement_bound() -> None:
    with pytest.raises(PolicyRefused, match="dp-placements"):
        check_plan(SitePolicy(dp_placements=["distributed"]), _plan(*DP), _header())


def test_max_epsilon_is_the_sites_own_count() -> None:
    spent = [rdp_epsilon(1.0, 1.0, 1e-5, r) for r in (1, 2, 3)]
    policy = SitePolicy(max_epsilon=(spent[1] + spent[2]) / 2)
    check_plan(policy, _plan(*DP), _header(server_round=2))
    with pytest.raises(PolicyRefused, match=r"max-epsilon.*round 3"):
        check_plan(policy, _plan(*DP), _header(server_round=3))
    with pytest.raises(PolicyRefused, match="max-epsilon"):
        check_plan(policy, _plan(), _header())  # no DP at all


def test_max_epsilon_counts_the_sites_earlier_runs() -> None:
    """A new run (round 1 again) does not reset what the site has spent."""
    spent = [rdp_epsilon(1.0, 1.0, 1e-5, r) for r in (2, 3)]
    policy = SitePolicy(max_epsilon=(spent[0] + spent[1]) / 2)  # 2 rounds fit, 3 do not
    check_plan(policy, _plan(*DP), _header(server_round=1), earlier=((1.0, 1),))
    with pytest.raises(PolicyRefused, match=r"after 2 round\(s\) of earlier runs"):
        check_plan(policy, _plan(*DP), _header(server_round=1), earlier=((1.0, 2),))
    with pytest.raises(PolicyRefused, match="max-epsilon"):  # two earlier runs of one round
        check_plan(policy, _plan(*DP), _header(server_round=1), earlier=((1.0, 1), (1.0, 1)))
    # A much noisier earlier run costs less than a round at multiplier 1.
    check_plan(policy, _plan(*DP), _header(server_round=1), earlier=((50.0, 1),))


def test_rules_modules_and_rounds() -> None:
    plan = _plan()
    with pytest.raises(PolicyRefused, match=r"policy.rules = \['ffa'\], but the plan has 'fedavg'"):
        check_plan(SitePolicy(rules=["ffa"]), plan, _header())
    with pytest.raises(PolicyRefused, match=r"policy.modules = \['other'\].*\['shared'\]"):
        check_plan(SitePolicy(modules=["other"]), plan, _header())
    check_plan(SitePolicy(max_rounds=2), plan, _header(server_round=2))
    with pytest.raises(PolicyRefused, match="max-rounds = 2, but the plan has 'round 3'"):
        check_plan(SitePolicy(max_rounds=2), plan, _header(server_round=3))
