"""A site's policy check: does a (signed) plan give the protection the site demands?

The coordinator signs every instruction (``common.instructions``), which shows that the plan
comes from the coordinator the site enrolled with; it does not show that the plan is one the
site should accept. ``check_plan`` compares the plan with the site's ``SitePolicy`` (its
``site.toml`` ``[policy]``) and refuses a downgrade (plain deltas, less DP noise, more rounds,
an epsilon above the site's bound, a rule or module it did not agree to) with a message that
names the policy key, the site's bound and the plan's value.

Where the site can compute a protection itself it does, rather than trust the plan's figure:
its own epsilon from the noise multiplier and the round number (at the policy's delta),
composed with what it released in earlier runs (``client.privacy_ledger``), and,
for distributed noise, the share it must add for the secure-sum threshold in the
instruction's header.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord

from common import protocol as P
from common.config import SitePlan, SitePolicy
from common.errors import FedloraError


class PolicyRefused(FedloraError):
    """A plan asks for less protection than the site's policy allows."""


def _refuse(key: str, bound: object, found: object) -> PolicyRefused:
    return PolicyRefused(
        f"plan refused by this site's policy: policy.{key} = {bound!r}, but the plan has {found!r}"
    )


Releases = tuple[tuple[float, int], ...]  # (noise multiplier, rounds) of earlier runs


def _epsilon(noise_multiplier: float, delta: float, rounds: int, earlier: Releases) -> float:
    from common.dp import composed_epsilon, rdp_epsilon  # dp_accounting: ~2 s to import

    if not earlier:
        return rdp_epsilon(noise_multiplier, 1.0, delta, rounds)  # cached per value
    return composed_epsilon((*earlier, (noise_multiplier, rounds)), delta)


def _threshold(header: ConfigRecord) -> int | None:
    params = header.get(P.KEY_SECAGG_PARAMS)
    if params is None:
        return None
    return int(json.loads(str(params))["threshold"])


def _check_dp(
    policy: SitePolicy, plan: SitePlan, header: ConfigRecord, server_round: int, earlier: Releases
) -> None:
    dp = plan.dp
    needs_dp = policy.min_noise_multiplier is not None or policy.max_epsilon is not None
    if dp is None or plan.clip is None:
        if needs_dp:
            key = "min-noise-multiplier" if policy.min_noise_multiplier else "max-epsilon"
            bound = policy.min_noise_multiplier or policy.max_epsilon
            raise _refuse(key, bound, "no DP (privacy.dp.enabled = false)")
        return
    if dp.placement not in policy.dp_placements:
        raise _refuse("dp-placements", policy.dp_placements, dp.placement)
    if policy.min_noise_multiplier is not None and dp.noise_multiplier < (
        policy.min_noise_multiplier
    ):
        raise _refuse("min-noise-multiplier", policy.min_noise_multiplier, dp.noise_multiplier)
    threshold = _threshold(header)
    if dp.placement == "distributed" and threshold is not None:
        from common.dp import site_noise_std

        own = site_noise_std(dp.noise_multiplier, plan.clip, "distributed", max(2, threshold))
        if plan.site_noise_std < own * (1 - 1e-9):
            raise PolicyRefused(
                f"plan refused: its site-noise-std {plan.site_noise_std!r} is below the "
                f"{own!r} that noise multiplier {dp.noise_multiplier} with clip {plan.clip} "
                f"needs when as few as {max(2, threshold)} sites (the secure-sum threshold) "
                "complete a round"
            )
    if policy.max_epsilon is not None:
        spent = _epsilon(dp.noise_multiplier, policy.delta, server_round, earlier)
        if spent > policy.max_epsilon:
            runs = sum(rounds for _, rounds in earlier)
            before = f" after {runs} round(s) of earlier runs" if earlier else ""
            raise PolicyRefused(
                f"plan refused by this site's policy: policy.max-epsilon = "
                f"{policy.max_epsilon!r}, but round {server_round} at noise multiplier "
                f"{dp.noise_multiplier}{before} would bring this site's epsilon to "
                f"{spent:.3g} (at policy.delta = {policy.delta:g})"
            )


def check_plan(
    policy: SitePolicy, plan: SitePlan, header: ConfigRecord, earlier: Releases = ()
) -> None:
    """Raise ``PolicyRefused`` unless ``plan`` (and its header's round) meets ``policy``;
    ``earlier``: the site's DP releases in other runs (``client.privacy_ledger``)."""
    if plan.privacy_mode not in policy.privacy_modes:
        raise _refuse("privacy-modes", policy.privacy_modes, plan.privacy_mode)
    server_round = int(str(header[P.KEY_ROUND]))
    if policy.max_rounds is not None and server_round > policy.max_rounds:
        raise _refuse("max-rounds", policy.max_rounds, f"round {server_round}")
    if policy.rules is not None and plan.rule not in policy.rules:
        raise _refuse("rules", policy.rules, plan.rule)
    if policy.modules is not None:
        extra = sorted(set(plan.modules) - set(policy.modules))
        if extra:
            raise _refuse("modules", policy.modules, extra)
    _check_dp(policy, plan, header, max(1, server_round), earlier)
