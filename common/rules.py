"""Aggregation rules for LoRA adapters: which tensors sites send and how the server combines them.

Every rule is a pure function over per-site inputs and declares ``sum_only``: True when its
result follows from ``sum_i w_i * x_i`` and ``sum_i w_i`` alone, so that it also runs under
secure aggregation (``sum_only_aggregate``), where the coordinator never sees one site's delta.

- ``fedavg`` (FedIT): weighted mean of A-deltas and B-deltas separately. Sum-only; biased for
  the product, because mean(B_i) @ mean(A_i) != mean(B_i @ A_i).
- ``ffa`` (FFA-LoRA): A is frozen at an initialisation every site shares, only B (and any
  non-LoRA tensor) is trained and sent. Sum-only and exact: mean(B_i) @ A = mean(B_i @ A).
- ``fedsa`` (FedSA-LoRA): A (and any non-LoRA tensor) is averaged, B stays private at each
  site. Sum-only.
- ``exact`` (``common.exact``): the weighted mean of the products ``B_i @ A_i * s_i``
  re-factored to the global rank by QR of the stacked factors and an SVD of the small core,
  never forming the d x k matrix. Needs every site's factors (sealed mode); sites may have
  different ranks.

Keys follow peft's saved names (``common.lora_keys``): ``<prefix>.lora_A.weight``
(r, k) and ``<prefix>.lora_B.weight`` (d, r), or ``<prefix>.lora_embedding_A`` /
``lora_embedding_B`` for embeddings; every other key (a ``modules_to_save`` head, a DoRA
magnitude) is aggregated as a plain weighted mean by every rule. Scaling is peft's
``lora_alpha / r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from common.adapters import (
    AdapterState,
    AggregationError,
    _quote,  # bounded key names in messages: a hostile key may be megabytes
    aggregate_fedavg,
    check_values,
)
from common.errors import ConfigError, UpdateRejected

# Re-exports: these moved to common.exact and common.lora_keys; importers here keep working.
from common.exact import aggregate_exact as aggregate_exact
from common.exact import factors_for_site_rank as factors_for_site_rank
from common.exact import refactor_mean_of_products as refactor_mean_of_products
from common.lora_keys import lora_factor as lora_factor
from common.lora_keys import lora_pairs as lora_pairs


def all_sent_keys(state_keys: Iterable[str]) -> list[str]:
    """Keys a site sends under ``fedavg`` and ``exact``: every trainable tensor."""
    return list(state_keys)


def ffa_sent_keys(state_keys: Iterable[str]) -> list[str]:
    """Keys a site sends under ``ffa``: the B factors and non-LoRA tensors, never A.

    For a square layer (d = k) this is half of the LoRA bytes.
    """
    return [key for key in state_keys if lora_factor(key) != "A"]


def fedsa_sent_keys(state_keys: Iterable[str]) -> list[str]:
    """Keys a site sends under ``fedsa``: the A factors and non-LoRA tensors, never B."""
    return [key for key in state_keys if lora_factor(key) != "B"]


def check_ffa_payload(delta: Mapping[str, torch.Tensor]) -> None:
    """Check that an FFA-LoRA delta (or sum of deltas) leaves every A factor unchanged.

    Raises
    ------
    UpdateRejected
        Naming the first A key whose delta is not exactly zero: the site trained a factor
        that must stay frozen, so its B no longer composes with the shared A.
    """
    for key, tensor in delta.items():
        if lora_factor(key) == "A" and bool(torch.any(tensor != 0)):
            raise UpdateRejected(
                f"ffa: delta of frozen factor {_quote(key)} is non-zero (max |x| = "
                f"{float(tensor.abs().max()):.3g}); A must stay at the shared initialisation"
            )


def check_fedsa_payload(delta: Mapping[str, torch.Tensor]) -> None:
    """Check that a FedSA-LoRA delta (or sum of deltas) carries no B factor.

    Raises
    ------
    UpdateRejected
        Naming the first B key: B is private to the site and must never leave it.
    """
    for key in delta:
        if lora_factor(key) == "B":
            raise UpdateRejected(f"fedsa: {_quote(key)} is a private B factor and must not be sent")


def _accept_any(delta: Mapping[str, torch.Tensor]) -> None:
    """Payload check of the rules that accept every key (fedavg, exact)."""


def _checked_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    check: Callable[[Mapping[str, torch.Tensor]], None],
) -> AdapterState:
    """``aggregate_fedavg`` after running the rule's payload check on every delta."""
    for index, delta in enumerate(deltas):
        try:
            check(delta)
        except UpdateRejected as err:
            raise UpdateRejected(f"deltas[{index}] of {len(deltas)}: {err}") from err
    return aggregate_fedavg(deltas, weights)


def aggregate_ffa(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> AdapterState:
    """FFA-LoRA: weighted mean of the B deltas (and non-LoRA deltas); A stays frozen.

    Exact for the product: every site shares A, so mean(B_i) @ A = mean(B_i @ A).

    Parameters
    ----------
    deltas
        One delta per site with the same keys: ``ffa_sent_keys`` of the module, or all keys
        with A deltas that are exactly zero.
    weights
        One weight per site (examples or tokens), >= 0.

    Returns
    -------
    AdapterState
        The mean delta, float32, with the keys of ``deltas[0]``.

    Raises
    ------
    UpdateRejected
        A non-zero A delta, or keys/shapes that differ from ``deltas[0]`` (naming site and key).
    AggregationError
        No deltas or unusable weights.
    """
    return _checked_mean(deltas, weights, check_ffa_payload)


def aggregate_fedsa(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> AdapterState:
    """FedSA-LoRA: weighted mean of the A deltas (and non-LoRA deltas); B stays at the sites.

    Parameters
    ----------
    deltas
        One delta per site with the keys ``fedsa_sent_keys`` of the module.
    weights
        One weight per site (examples or tokens), >= 0.

    Returns
    -------
    AdapterState
        The mean delta, float32, with the keys of ``deltas[0]``.

    Raises
    ------
    UpdateRejected
        A delta carrying a B factor, or keys/shapes that differ from ``deltas[0]``.
    AggregationError
        No deltas or unusable weights.
    """
    return _checked_mean(deltas, weights, check_fedsa_payload)


@dataclass(frozen=True)
class Rule:
    """One aggregation rule and what the round around it needs to know.

    Attributes
    ----------
    name
        The value of ``aggregation.rule``.
    sum_only
        True when the result follows from ``sum_i w_i x_i`` and ``sum_i w_i`` alone, so the
        rule works under secure aggregation; False when it needs each site's delta (sealed).
    aggregate
        The per-site computation: ``(deltas, weights)`` for sum-only rules,
        ``aggregate_exact``'s signature for ``exact``.
    sent_keys
        Which keys of a module's state a site sends.
    check_payload
        Rejects a delta (or sum of deltas) this rule must never receive.
    """

    name: str
    sum_only: bool
    aggregate: Callable[..., AdapterState]
    sent_keys: Callable[[Iterable[str]], list[str]]
    check_payload: Callable[[Mapping[str, torch.Tensor]], None]


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("fedavg", True, aggregate_fedavg, all_sent_keys, _accept_any),
        Rule("ffa", True, aggregate_ffa, ffa_sent_keys, check_ffa_payload),
        Rule("fedsa", True, aggregate_fedsa, fedsa_sent_keys, check_fedsa_payload),
        Rule("exact", False, aggregate_exact, all_sent_keys, _accept_any),
    )
}


def get_rule(name: str) -> Rule:
    """The rule called ``name``.

    Raises
    ------
    ConfigError
        Naming ``aggregation.rule``, the value and the known rules.
    """
    if name not in RULES:
        known = ", ".join(repr(rule) for rule in sorted(RULES))
        raise ConfigError(
            f"aggregation.rule = {name!r} is not a known rule; expected one of {known}"
        )
    return RULES[name]


def sum_only_aggregate(
    rule: Rule, weighted_sum: Mapping[str, torch.Tensor], total_weight: float
) -> AdapterState:
    """A sum-only rule's result from what secure aggregation reveals.

    Every sum-only rule is the weighted mean of the keys it receives, so the result is
    ``weighted_sum / total_weight``, after the rule's payload check.

    Parameters
    ----------
    rule
        A rule with ``sum_only`` True.
    weighted_sum
        ``sum_i w_i * delta_i`` over the surviving sites, keys ``rule.sent_keys``.
    total_weight
        ``sum_i w_i`` over the same sites.

    Returns
    -------
    AdapterState
        Float32, computed in float64, equal to ``rule.aggregate`` on the individual deltas.

    Raises
    ------
    ConfigError
        If the rule needs individual deltas (``exact``): use privacy mode ``sealed``.
    AggregationError
        If ``total_weight`` is not a positive finite number.
    UpdateRejected
        If the sum fails the rule's payload check or holds non-finite values.
    """
    if not rule.sum_only:
        raise ConfigError(
            f"aggregation.rule = {rule.name!r} needs each site's delta and cannot be computed "
            "from the sum that secure aggregation reveals; use privacy mode 'sealed' or a "
            f"sum-only rule ({', '.join(repr(r.name) for r in RULES.values() if r.sum_only)})"
        )
    if not math.isfinite(total_weight) or total_weight <= 0:
        raise AggregationError(f"total weight is {total_weight}, expected > 0")
    rule.check_payload(weighted_sum)
    check_values(weighted_sum, what="weighted sum")
    mean = {
        key: (tensor.detach().to(torch.float64) / total_weight).to(torch.float32)
        for key, tensor in weighted_sum.items()
    }
    # A finite sum over a tiny total weight can still overflow float32.
    check_values(mean, what="weighted mean (sum / total weight)")
    return mean
