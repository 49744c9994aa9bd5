"""The coordinator's aggregation step: rule, optional DP, server optimizer, and their state.

One round, per sent module: validated per-site deltas of the sites that sent it (only the keys
the rule sends) -> the rule's aggregate
(or, with DP, the noisy fixed-denominator mean of clipped deltas) -> the server optimizer's
step on those keys -> the new global adapter. Everything that must survive a restart is in
``state_tensors`` / ``state_meta`` so that a resumed run continues bit for bit.

When the mean needs only the weighted sum (a sum-only rule, no DP, no server clipping, no
robust mean: ``Aggregator.streams``), ``aggregate_streaming`` takes the validated payloads
instead of decoded deltas and folds them one at a time into a flat float64 sum
(``common.streaming``): memory is one adapter whatever the number of sites, and the result is
bit-identical to ``aggregate`` on the decoded deltas (same fractions, same order, float64).
"""

from __future__ import annotations

import base64
import math
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
from common.encoding import decode_delta_flat
from common.errors import ConfigError, UpdateRejected
from common.exact import aggregate_exact, factors_for_site_rank, rank_fill_seed
from common.modules import join_modules, split_modules
from common.robust import aggregate_median, aggregate_trimmed_mean
from common.rules import get_rule, sum_only_aggregate
from common.scopes import PRIVATE, module_group
from common.server_opt import server_optimizer_for
from common.streaming import FlatLayout, StreamingMean

OPTIMIZER_PREFIX = "optimizer/"
CONTROL_PREFIX = "scaffold-c/"  # checkpoint keys of SCAFFOLD's c: scaffold-c/<module>/<key>


@dataclass(frozen=True)
class SiteDelta:
    site: str
    examples: int
    delta: AdapterState  # ``<module>/<key>``: the keys the rule sends, of the site's modules


@dataclass(frozen=True)
class SitePayloads:
    """One accepted reply for ``Aggregator.aggregate_streaming``: still encoded."""

    site: str
    examples: int
    payloads: dict[str, bytes]  # module -> opened, already validated payload (the sent keys)


class Aggregator:
    """Turns one round's accepted deltas into the next global state of every sent module.

    Each sent module aggregates over the sites that sent it (all sites for a shared module,
    its group's for a group module) and has its own server optimizer state; the privacy
    accountant is one per run.
    """

    def __init__(self, cfg: RunConfig) -> None:
        agg, dp = cfg.aggregation, cfg.privacy.dp
        self.cfg = cfg
        self.rule = get_rule(agg.rule)
        self.modules = {n: m for n, m in sorted(cfg.modules.items()) if m.scope != PRIVATE}
        self.optimizers = {
            name: server_optimizer_for(agg, cfg.federation.rounds) for name in self.modules
        }
        self.accountant: PrivacyAccountant | None = None
        # SCAFFOLD's c (train.scaffold): the weighted mean of the sites' control variates over
        # every sent tensor, zero until the first round adds to it; None when off.
        self.control: AdapterState | None = {} if cfg.train.scaffold else None
        self.noise = torch.Generator()
        if dp.enabled:
            # No amplification by sampling (q = 1), even with federation.fraction-train < 1:
            # the coordinator draws the cohort and knows it, and it is the party the noise
            # must also hold against (secure-sum, distributed DP), so the draw is no secret.
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

    # -- what a site sends --------------------------------------------------------------------
    def sent_keys(self, global_state: AdapterState) -> list[str]:
        """The ``<module>/<key>`` keys of ``global_state`` that sites send, in order."""
        return [
            key
            for name, state in split_modules(global_state).items()
            for key in join_modules({name: {k: state[k] for k in self.rule.sent_keys(state)}})
        ]

    def site_start(
        self, module: str, site: str, global_module: AdapterState, version: int
    ) -> AdapterState:
        """The state ``site`` started module ``module`` from: the global, or its rank's part."""
        run_module = self.modules[module]
        mine = run_module.for_site(site)
        if mine.rank == run_module.rank:
            return global_module
        return factors_for_site_rank(
            global_module,
            mine.rank,
            run_module.alpha / run_module.rank,
            mine.alpha / mine.rank,
            fill_seed=rank_fill_seed(self.cfg.train.seed, version, module),
        )

    # -- SCAFFOLD -------------------------------------------------------------------------
    def control_for(self, global_state: AdapterState) -> AdapterState:
        """SCAFFOLD's ``c`` over the sent keys of ``global_state`` (zeros where not yet set)."""
        if self.control is None:
            raise AggregationError("train.scaffold is off: there is no control variate")
        return {
            key: self.control.get(key, torch.zeros_like(global_state[key], dtype=torch.float32))
            for key in self.sent_keys(global_state)
        }

    def update_control(self, changes: Sequence[tuple[int, AdapterState]]) -> None:
        """``c += (|S| / N) sum_i w_i dc_i / sum_i w_i`` over the accepted sites ``S``.

        ``changes``: (examples, ``c_i(new) - c_i``) per accepted site, in a fixed order. With
        every site taking part this keeps ``c`` the example-weighted mean of the ``c_i``; the
        factor ``|S| / N`` (Karimireddy et al.'s) is for rounds some sites missed.
        """
        if self.control is None or not changes:
            return
        for key in sorted({k for _, change in changes for k in change}):
            members = [(n, change[key]) for n, change in changes if key in change]
            total = math.fsum(float(n) for n, _ in members)
            acc = torch.zeros_like(members[0][1], dtype=torch.float64)
            for n, change in members:
                acc += (float(n) / total) * change.double()
            self._add_control(key, acc, len(members))

    def update_control_from_sum(
        self, weighted_sum: AdapterState, total_weight: float, count: int
    ) -> None:
        """``update_control`` from secure sum's unmasked ``sum w_i dc_i`` over ``count`` sites."""
        if self.control is None:
            return
        for key in sorted(weighted_sum):
            self._add_control(key, weighted_sum[key].double() / total_weight, count)

    def _add_control(self, key: str, mean: torch.Tensor, count: int) -> None:
        share = count / self._holders(key.partition("/")[0])
        assert self.control is not None
        old = self.control.get(key)
        new = share * mean if old is None else old.double() + share * mean
        self.control[key] = new.float()

    def _holders(self, module: str) -> int:
        """How many sites send ``module``: all, or its group's."""
        group = module_group(self.modules[module].scope)
        return len(self.cfg.groups.get(group, [])) if group else self.cfg.federation.sites

    # -- one round --------------------------------------------------------------------------
    @property
    def streams(self) -> bool:
        """True when every module's mean follows from the weighted sum alone, so replies can
        be summed one at a time (``aggregate_streaming``)."""
        agg = self.cfg.aggregation
        return (
            self.rule.sum_only
            and not self.cfg.privacy.dp.enabled
            and agg.robust == "none"
            and agg.server_clip is None
        )

    def aggregate_streaming(
        self, global_state: AdapterState, updates: Sequence[SitePayloads]
    ) -> AdapterState:
        """``aggregate`` for rounds where ``streams`` holds, from still-encoded payloads.

        Each module's replies are decoded one at a time into one scratch vector and added
        into one float64 sum, in the order of ``updates``: memory is one adapter per module.
        A module no update carries stays as it is.
        """
        if not self.streams:
            raise AggregationError(f"rule {self.rule.name!r} with this config cannot stream")
        if not updates:
            raise AggregationError("no accepted updates to aggregate")
        by_module = split_modules(global_state)
        means: dict[str, AdapterState] = {}
        for name, state in by_module.items():
            members = [u for u in updates if name in u.payloads]
            if members:
                means[name] = self._streamed_mean(name, state, members)
        new = dict(by_module)
        if means:
            stepped = self.apply_mean(join_modules(by_module), join_modules(means))
            new.update({n: s for n, s in split_modules(stepped).items() if n in means})
        return join_modules({name: new[name] for name in by_module})

    def _streamed_mean(
        self, module: str, state: AdapterState, members: Sequence[SitePayloads]
    ) -> AdapterState:
        layout = FlatLayout({k: tuple(state[k].shape) for k in self.rule.sent_keys(state)})
        # The same fractions as aggregate_fedavg: w_i / fsum(w), accumulated in float64.
        total = math.fsum(float(u.examples) for u in members)
        mean = StreamingMean(layout, total, torch.float64, check=self.rule.check_payload)
        scratch = torch.empty(layout.numel, dtype=torch.float32)
        bound = self.cfg.privacy.max_payload_bytes
        for u in members:
            try:
                flat = decode_delta_flat(u.payloads[module], bound, layout, scratch)
                mean.add(flat, u.examples)
            except UpdateRejected as exc:  # validated before: decoding is deterministic
                raise AggregationError(f"{u.site}, module {module!r}: {exc}") from exc
        return mean.mean()

    def aggregate(
        self,
        global_state: AdapterState,
        updates: Sequence[SiteDelta],
        server_round: int,
        version: int,
    ) -> AdapterState:
        """The new global state from the round's accepted updates (already validated).

        A module no accepted update carries (a group whose sites all failed) stays as it is.
        """
        if not updates:
            raise AggregationError("no accepted updates to aggregate")
        by_module = split_modules(global_state)
        per_site = [split_modules(u.delta) for u in updates]
        new: dict[str, AdapterState] = {}
        means: dict[str, AdapterState] = {}
        for name, state in by_module.items():
            members = [
                SiteDelta(u.site, u.examples, deltas[name])
                for u, deltas in zip(updates, per_site, strict=True)
                if name in deltas
            ]
            if not members:
                new[name] = state
            elif self.rule.name == "exact":
                new[name] = self._aggregate_exact(name, state, members, server_round, version)
            else:
                means[name] = self._mean_delta(members)
        if means:
            stepped = self.apply_mean(join_modules(by_module), join_modules(means))
            new.update({n: s for n, s in split_modules(stepped).items() if n in means})
        return join_modules({name: new[name] for name in by_module})

    def apply_mean(self, global_state: AdapterState, mean: AdapterState) -> AdapterState:
        """Each module's server-optimizer step on the rule's keys; other keys stay as they are.

        ``mean`` holds the ``<module>/<key>`` mean deltas of the modules that moved this round.
        """
        by_module, moved = split_modules(global_state), split_modules(mean)
        for name, delta in moved.items():
            state = by_module[name]
            subset = {k: state[k] for k in self.rule.sent_keys(state)}
            by_module[name] = {**state, **self.optimizers[name].step(subset, delta)}
        if self.accountant is not None:
            self.accountant.step()
        return join_modules(by_module)

    @property
    def _denominator(self) -> int:
        """DP-FedAvg's fixed denominator: the expected training cohort (every site without
        sampling), never the count that replied, which would depend on who took part."""
        return self.cfg.federation.expected_train_cohort

    def mean_from_sum(self, weighted_sum: AdapterState, total_weight: float) -> AdapterState:
        """Secure-sum: the mean delta from the unmasked ``sum w_i x_i`` and ``sum w_i``."""
        dp = self.cfg.privacy.dp
        if not dp.enabled:
            return sum_only_aggregate(self.rule, weighted_sum, total_weight)
        # Weights are 1 under DP; the denominator is the fixed expected cohort. Distributed
        # placement: the sites' noise is already in the sum; central: the coordinator adds it.
        std = coordinator_noise_std(dp.noise_multiplier, dp.clip, dp.placement)
        return dp_aggregate_mean(weighted_sum, std, self._denominator, self.noise)

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
        return dp_aggregate_mean(total, std, self._denominator, self.noise)

    def _aggregate_exact(
        self,
        module: str,
        global_module: AdapterState,
        updates: Sequence[SiteDelta],
        server_round: int,
        version: int,
    ) -> AdapterState:
        # Each site trained (its rank's part of) the global + delta_i: exact needs those.
        run_module = self.modules[module]
        states, scalings = [], []
        for u in updates:
            start = self.site_start(module, u.site, global_module, version)
            states.append({k: start[k] + u.delta[k] for k in start})
            mine = run_module.for_site(u.site)
            scalings.append(mine.alpha / mine.rank)  # peft's default (not rsLoRA)
        return aggregate_exact(
            states,
            [u.examples for u in updates],
            scalings,
            run_module.rank,
            run_module.alpha / run_module.rank,
            fill_seed=self.cfg.train.seed * 100_003 + server_round,
        )

    # -- checkpoint -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizers' tensors, keyed ``<module>/<slot>/<key>``."""
        out: dict[str, torch.Tensor] = {}
        for name, optimizer in self.optimizers.items():
            for key, value in optimizer.state_dict().items():
                if isinstance(value, torch.Tensor):
                    out[f"{OPTIMIZER_PREFIX}{name}/{key}"] = value
        for key, value in (self.control or {}).items():
            out[f"{CONTROL_PREFIX}{key}"] = value
        return out

    def state_meta(self) -> dict[str, Any]:
        scalars = {
            name: {k: v for k, v in opt.state_dict().items() if not isinstance(v, torch.Tensor)}
            for name, opt in self.optimizers.items()
        }
        return {
            "optimizers": scalars,
            "accountant": None if self.accountant is None else self.accountant.state(),
            "noise_rng": base64.b64encode(self.noise.get_state().numpy().tobytes()).decode(),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        scalars = meta["optimizers"]
        if set(scalars) != set(self.optimizers):
            raise ConfigError(
                f"the checkpoint holds server optimizer state of modules {sorted(scalars)}, "
                f"the config sends {sorted(self.optimizers)}"
            )
        for name, optimizer in self.optimizers.items():
            state: dict[str, torch.Tensor | float | int] = dict(scalars[name])
            prefix = f"{OPTIMIZER_PREFIX}{name}/"
            for key, value in tensors.items():
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = value
            optimizer.load_state_dict(state)
        if self.control is not None:
            self.control = {
                key[len(CONTROL_PREFIX) :]: value
                for key, value in tensors.items()
                if key.startswith(CONTROL_PREFIX)
            }
        if meta["accountant"] is not None:
            self.accountant = PrivacyAccountant.from_state(meta["accountant"])
        rng = bytearray(base64.b64decode(meta["noise_rng"]))
        self.noise.set_state(torch.frombuffer(rng, dtype=torch.uint8).clone())
