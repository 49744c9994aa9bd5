"""The coordinator's aggregation step: rule, optional DP, server optimizer, and their state.

One round: validated per-site deltas (only the keys the rule sends) -> the rule's aggregate
(or, with DP, the noisy fixed-denominator mean of clipped deltas) -> the server optimizer's
step on those keys -> the new global adapter. Everything that must survive a restart is in
``state_tensors`` / ``state_meta`` so that a resumed run continues bit for bit.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.adapters import AdapterState, AggregationError
from common.config import RunConfig
from common.dp import (
    PrivacyAccountant,
    check_budget,
    clip_delta,
    coordinator_noise_std,
    dp_aggregate_mean,
    secure_generator,
)
from common.exact import aggregate_exact
from common.robust import aggregate_median, aggregate_trimmed_mean
from common.rules import get_rule, sum_only_aggregate
from common.server_opt import make_server_optimizer

OPTIMIZER_PREFIX = "optimizer/"


@dataclass(frozen=True)
class SiteDelta:
    site: str
    examples: int
    delta: AdapterState  # the keys the rule sends


class Aggregator:
    """Turns one round's accepted deltas into the next global adapter state."""

    def __init__(self, cfg: RunConfig) -> None:
        agg, dp = cfg.aggregation, cfg.privacy.dp
        self.cfg = cfg
        self.rule = get_rule(agg.rule)
        self.optimizer = make_server_optimizer(
            agg.server_optimizer,
            agg.server_lr,
            agg.server_momentum,
            agg.server_beta1,
            agg.server_beta2,
            agg.server_tau,
        )
        module = cfg.modules["shared"]
        self.scaling = module.alpha / module.rank  # peft's default (not rsLoRA)
        self.accountant: PrivacyAccountant | None = None
        self.noise = torch.Generator()
        if dp.enabled:
            # Every site takes part in every round: no amplification by sampling (q = 1).
            self.accountant = PrivacyAccountant(dp.noise_multiplier, 1.0, dp.delta)
            self.noise = (
                secure_generator() if dp.seed is None else torch.Generator().manual_seed(dp.seed)
            )

    # -- privacy budget ---------------------------------------------------------------------
    def check_budget(self) -> None:
        """Raise ``PrivacyBudgetExceeded`` if one more round would exceed the ε budget."""
        if self.accountant is not None:
            check_budget(self.accountant, self.cfg.privacy.dp.epsilon_budget)

    @property
    def epsilon(self) -> float | None:
        return None if self.accountant is None else self.accountant.epsilon()

    # -- one round --------------------------------------------------------------------------
    def sent_keys(self, global_state: AdapterState) -> list[str]:
        return self.rule.sent_keys(global_state)

    def aggregate(
        self, global_state: AdapterState, updates: Sequence[SiteDelta], server_round: int
    ) -> AdapterState:
        """The new global state from the round's accepted updates (already validated)."""
        if not updates:
            raise AggregationError("no accepted updates to aggregate")
        if self.rule.name == "exact":
            return self._aggregate_exact(global_state, updates, server_round)
        return self.apply_mean(global_state, self._mean_delta(updates))

    def apply_mean(self, global_state: AdapterState, mean: AdapterState) -> AdapterState:
        """The server optimizer's step on the rule's keys; the other keys stay as they are."""
        subset = {k: global_state[k] for k in self.sent_keys(global_state)}
        stepped = self.optimizer.step(subset, mean)
        if self.accountant is not None:
            self.accountant.step()
        return {**global_state, **stepped}

    def mean_from_sum(self, weighted_sum: AdapterState, total_weight: float) -> AdapterState:
        """Secure-sum: the mean delta from the unmasked ``sum w_i x_i`` and ``sum w_i``."""
        dp = self.cfg.privacy.dp
        if not dp.enabled:
            return sum_only_aggregate(self.rule, weighted_sum, total_weight)
        # Weights are 1 under DP; the denominator is the fixed expected cohort. Distributed
        # placement: the sites' noise is already in the sum; central: the coordinator adds it.
        std = coordinator_noise_std(dp.noise_multiplier, dp.clip, dp.placement)
        return dp_aggregate_mean(weighted_sum, std, self.cfg.federation.sites, self.noise)

    def _mean_delta(self, updates: Sequence[SiteDelta]) -> AdapterState:
        dp, agg = self.cfg.privacy.dp, self.cfg.aggregation
        if not dp.enabled:
            deltas = [u.delta for u in updates]
            if agg.server_clip is not None:
                deltas = [clip_delta(d, agg.server_clip)[0] for d in deltas]
            if agg.robust == "median":
                return aggregate_median(deltas)
            if agg.robust == "trimmed-mean":
                return aggregate_trimmed_mean(deltas, agg.trim_fraction)
            return self.rule.aggregate(deltas, [u.examples for u in updates])
        # DP-FedAvg: re-clip (bounds a site that skipped its own clipping), sum with weight 1,
        # divide by the FIXED expected cohort, with central noise of std sigma * C.
        clipped = [clip_delta(u.delta, dp.clip)[0] for u in updates]
        for delta in clipped:
            self.rule.check_payload(delta)
        total = {k: torch.stack([d[k].double() for d in clipped]).sum(0) for k in clipped[0]}
        std = coordinator_noise_std(dp.noise_multiplier, dp.clip, dp.placement)
        return dp_aggregate_mean(total, std, self.cfg.federation.sites, self.noise)

    def _aggregate_exact(
        self, global_state: AdapterState, updates: Sequence[SiteDelta], server_round: int
    ) -> AdapterState:
        # Each site trained global + delta_i; exact needs those full factors.
        states = [{k: global_state[k] + u.delta[k] for k in global_state} for u in updates]
        rank = self.cfg.modules["shared"].rank
        return aggregate_exact(
            states,
            [u.examples for u in updates],
            [self.scaling] * len(updates),
            rank,
            self.scaling,
            fill_seed=self.cfg.train.seed * 100_003 + server_round,
        )

    # -- checkpoint -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = self.optimizer.state_dict()
        return {OPTIMIZER_PREFIX + k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def state_meta(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        return {
            "optimizer": scalars,
            "accountant": None if self.accountant is None else self.accountant.state(),
            "noise_rng": base64.b64encode(self.noise.get_state().numpy().tobytes()).decode(),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        optimizer: dict[str, torch.Tensor | float | int] = dict(meta["optimizer"])
        for key, value in tensors.items():
            if key.startswith(OPTIMIZER_PREFIX):
                optimizer[key[len(OPTIMIZER_PREFIX) :]] = value
        self.optimizer.load_state_dict(optimizer)
        if meta["accountant"] is not None:
            self.accountant = PrivacyAccountant.from_state(meta["accountant"])
        rng = bytearray(base64.b64decode(meta["noise_rng"]))
        self.noise.set_state(torch.frombuffer(rng, dtype=torch.uint8).clone())
