"""The ``exact`` rule: the weighted mean of the LoRA products, re-factored to the global rank.

The mean of the products ``B_i @ A_i * s_i`` is re-factored by QR of the stacked factors and an
SVD of the small core, never forming the d x k matrix. It needs every site's full factors
(sealed mode); sites may have different ranks (``factors_for_site_rank``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from common.adapters import (
    AdapterState,
    AggregationError,
    _fractions,  # weight validation and normalisation, shared with aggregate_fedavg
    _quote,  # bounded key names in messages: a hostile key may be megabytes
    aggregate_fedavg,
    check_shapes,
    check_values,
)
from common.errors import UpdateRejected
from common.lora_keys import lora_factor, lora_pairs


def _check_exact_site(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    pairs: list[tuple[str, str]],
    what: str,
) -> None:
    """Same keys as ``reference``; each pair composes; d and k (not r) match ``reference``."""
    check_shapes({key: () for key in state}, {key: () for key in reference}, what=what)
    check_values(state, what=what)
    for a_key, b_key in pairs:
        a, b = state[a_key], state[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UpdateRejected(
                f"{what}: {_quote(b_key)} {tuple(b.shape)} and {_quote(a_key)} {tuple(a.shape)} "
                "do not compose; expected B (d, r) and A (r, k)"
            )
        want = (reference[b_key].shape[0], reference[a_key].shape[1])
        if (b.shape[0], a.shape[1]) != want:
            raise UpdateRejected(
                f"{what}: {_quote(a_key)} gives a ({b.shape[0]}, {a.shape[1]}) product, "
                f"expected {want}"
            )
    for key, tensor in reference.items():
        if lora_factor(key) is None and state[key].shape != tensor.shape:
            raise UpdateRejected(
                f"{what} tensor {_quote(key)} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )


def _canonical_signs(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip (B column, A row) pairs so that each column's largest-magnitude entry is positive.

    The product is unchanged; the factors no longer depend on the arbitrary signs of QR and
    SVD, which keeps consecutive global versions comparable entry by entry.
    """
    if b.shape[1] == 0:
        return b, a
    rows = b.abs().argmax(dim=0)
    signs = torch.sign(b.gather(0, rows.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return b * signs, a * signs.unsqueeze(1)


def refactor_mean_of_products(
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    rank: int,
    scaling: float,
    fill: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``sum_i c_i * B_i @ A_i``, never forming the d x k matrix.

    Stack ``B_cat = [sqrt(c_1) B_1 | ...]`` (d x R) and ``A_cat = [sqrt(c_1) A_1; ...]`` (R x k),
    R = sum of the ranks, so that ``B_cat @ A_cat`` is the sum. With ``Q_B R_B = qr(B_cat)``,
    ``Q_A R_A = qr(A_cat^T)`` and ``U S V^T = svd(R_B R_A^T)`` the sum is
    ``(Q_B U) S (Q_A V)^T``, an SVD (Eckart-Young: its first ``rank`` terms are optimal).
    Cost O((d + k) R^2 + R^3) time and O((d + k) R) memory.

    Parameters
    ----------
    a_factors, b_factors
        ``A_i`` (r_i, k) and ``B_i`` (d, r_i), float64.
    coefficients
        ``c_i >= 0``: weight fraction times the site's scaling.
    rank
        Rank of the result; singular directions beyond R are zero.
    scaling
        Scaling of the result: ``B @ A * scaling`` is the approximation.
    fill
        If given, directions without signal get fresh A rows (``_revive_dead_directions``).

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(A, B)`` of shapes (rank, k) and (d, rank), float64, the singular values split evenly
        (``B = Q_B U sqrt(S) / sqrt(scaling)``, ``A = sqrt(S) V^T Q_A^T / sqrt(scaling)``),
        ordered by decreasing singular value, signs canonical.
    """
    roots = [math.sqrt(c) for c in coefficients]
    b_cat = torch.cat([b * root for b, root in zip(b_factors, roots, strict=True)], dim=1)
    a_cat = torch.cat([a * root for a, root in zip(a_factors, roots, strict=True)], dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = min(rank, sigma.numel())
    half = sigma[:keep].sqrt() / math.sqrt(scaling)
    b_new, a_new = _canonical_signs(
        (q_b @ u[:, :keep]) * half, half.unsqueeze(1) * (vh[:keep] @ q_a.T)
    )
    missing = rank - keep
    b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], missing)], dim=1)
    a_new = torch.cat([a_new, a_new.new_zeros(missing, a_new.shape[1])], dim=0)
    if fill is not None:
        return _revive_dead_directions(a_new, b_new, sigma[:keep], fill)
    return a_new, b_new


def _revive_dead_directions(
    a: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor, fill: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each direction without signal a zero B column and a fresh A row, as peft's init.

    A direction whose singular value is zero (sum r_i < r, or the sites sent no signal, e.g.
    every B still zero) has a zero B column and a zero A row: neither gets a gradient at the
    sites, so it would stay dead in every later round. peft initialises B = 0 and A uniform
    in +-1/sqrt(k); doing the same keeps the product and lets training use the direction.
    Directions under float32 resolution of the largest one count as dead: dropping them moves
    the product by less than the float32 rounding of the result.
    """
    strength = torch.zeros(a.shape[0], dtype=torch.float64)
    strength[: sigma.numel()] = sigma.detach().cpu()
    dead = strength <= torch.finfo(torch.float32).eps * float(strength.max())
    bound = 1.0 / math.sqrt(a.shape[1])
    # Drawn on the CPU so that a seed gives the same rows on every device.
    fresh = torch.empty(int(dead.sum()), a.shape[1], dtype=torch.float64)
    fresh.uniform_(-bound, bound, generator=fill)
    a, b = a.clone(), b.clone()
    a[dead.to(a.device)] = fresh.to(a.device)
    b[:, dead.to(b.device)] = 0.0
    return a, b


def _check_exact_arguments(
    num_sites: int, site_scalings: Sequence[float], global_rank: int, global_scaling: float
) -> None:
    """Reject scalings and ranks that make the stacked factors meaningless."""
    if len(site_scalings) != num_sites:
        raise AggregationError(f"{num_sites} site states but {len(site_scalings)} site scalings")
    for index, scaling in enumerate(site_scalings):
        if not math.isfinite(scaling) or scaling <= 0:
            raise AggregationError(f"site_scalings[{index}] is {scaling}, expected > 0")
    if global_rank < 1:
        raise AggregationError(f"global_rank is {global_rank}, expected >= 1")
    if not math.isfinite(global_scaling) or global_scaling <= 0:
        raise AggregationError(f"global_scaling is {global_scaling}, expected > 0")


def aggregate_exact(
    site_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    site_scalings: Sequence[float],
    global_rank: int,
    global_scaling: float,
    fill_seed: int | None = None,
) -> AdapterState:
    """New global factors: the best rank-r approximation of the weighted mean of the products.

    For each LoRA pair, ``B_new @ A_new * global_scaling`` is the truncated SVD of
    ``sum_i w_i * B_i @ A_i * s_i / sum_i w_i`` (``refactor_mean_of_products``), computed in
    float64 without forming the d x k matrix: O((d + k) R^2 + R^3) per layer, R = sum_i r_i.
    Non-LoRA tensors are the weighted mean of the sites' values.

    Unlike the other rules this takes the sites' **full trained factors**, not deltas: the
    product is not linear in a factor delta. In sealed mode the coordinator reconstructs site
    i's factors as ``received_i + delta_i``, where ``received_i`` is what it sent that site
    (``factors_for_site_rank`` of the global state for a site with its own rank).

    Parameters
    ----------
    site_states
        One trained adapter state per site with the same keys; a site's rank r_i may differ
        from the others' (per-site rank override), d and k may not.
    weights
        One weight per site (examples or tokens), >= 0.
    site_scalings
        ``lora_alpha_i / r_i`` of each site's adapter.
    global_rank, global_scaling
        Rank r and scaling ``lora_alpha / r`` of the global adapter.
    fill_seed
        If given, directions without signal (zero singular value, or beyond R) get a zero B
        column and an A row drawn like peft's init from this seed, instead of a zero A row
        that would never train again; the product is the same. Use a fresh seed per round.

    Returns
    -------
    AdapterState
        Float32, keys of ``site_states[0]``: A (r, k), B (d, r) with the singular values
        split evenly and ordered, other tensors with their shapes.

    Raises
    ------
    UpdateRejected
        Keys differ, factors do not compose, d or k differ, or values are not finite.
    AggregationError
        No sites, unusable weights, scalings or global rank.
    """
    fractions = _fractions(len(site_states), weights)
    _check_exact_arguments(len(site_states), site_scalings, global_rank, global_scaling)
    reference = site_states[0]
    pairs = lora_pairs(reference)
    for index, state in enumerate(site_states):
        _check_exact_site(state, reference, pairs, what=f"site_states[{index}]")
    # A zero-weight site adds only zero columns to the stack: leave it out of the QR.
    used = [i for i, fraction in enumerate(fractions) if fraction > 0]
    coefficients = [fractions[i] * site_scalings[i] for i in used]
    fill = torch.Generator().manual_seed(fill_seed) if fill_seed is not None else None
    factors: AdapterState = {}
    for a_key, b_key in pairs:
        a_new, b_new = refactor_mean_of_products(
            [site_states[i][a_key].detach().to(torch.float64) for i in used],
            [site_states[i][b_key].detach().to(torch.float64) for i in used],
            coefficients,
            global_rank,
            global_scaling,
            fill,
        )
        factors[a_key], factors[b_key] = a_new.to(torch.float32), b_new.to(torch.float32)
    plain = [
        {key: t for key, t in state.items() if lora_factor(key) is None} for state in site_states
    ]
    factors.update(aggregate_fedavg(plain, weights))
    return {key: factors[key] for key in reference}


def factors_for_site_rank(
    state: Mapping[str, torch.Tensor],
    site_rank: int,
    global_scaling: float,
    site_scaling: float,
    fill_seed: int | None = None,
) -> AdapterState:
    """The global adapter as a site with its own rank receives it (per-site rank override).

    Keeps the first ``site_rank`` columns of B and rows of A, times
    ``sqrt(global_scaling / site_scaling)`` each so that ``B @ A * site_scaling`` is the kept
    part of the global product. For factors from ``aggregate_exact`` (ordered singular
    directions) that is the best rank-``site_rank`` approximation of the global product.

    A site whose rank exceeds the global rank gets zero B columns, and A rows that are zero,
    or, with ``fill_seed``, drawn like peft's default init (uniform in +-1/sqrt(k)): the
    product is unchanged either way, but zero A rows with zero B columns receive no gradient.
    The coordinator must call this with the same seed to reconstruct the site's state.

    Returns
    -------
    AdapterState
        Same keys and dtypes as ``state``; non-LoRA tensors are copied unchanged.
    """
    scalings_ok = all(math.isfinite(s) and s > 0 for s in (site_scaling, global_scaling))
    if site_rank < 1 or not scalings_ok:
        raise AggregationError(
            f"site_rank {site_rank}, site_scaling {site_scaling}, global_scaling "
            f"{global_scaling}: expected a rank >= 1 and finite scalings > 0"
        )
    factor = math.sqrt(global_scaling / site_scaling)
    gen = torch.Generator().manual_seed(fill_seed) if fill_seed is not None else None
    result = {key: tensor.detach().clone() for key, tensor in state.items()}
    for a_key, b_key in lora_pairs(state):
        a, b = state[a_key].detach(), state[b_key].detach()
        missing = max(0, site_rank - a.shape[0])
        # Drawn on the CPU so that the same seed gives the same rows on every device.
        pad_a = torch.zeros(missing, a.shape[1], dtype=torch.float64)
        if gen is not None:
            bound = 1.0 / math.sqrt(a.shape[1])
            pad_a.uniform_(-bound, bound, generator=gen)
        pad_b = torch.zeros(b.shape[0], missing, dtype=torch.float64, device=b.device)
        new_a = torch.cat([a[:site_rank].double() * factor, pad_a.to(a.device)], dim=0)
        new_b = torch.cat([b[:, :site_rank].double() * factor, pad_b], dim=1)
        result[a_key], result[b_key] = new_a.to(a.dtype), new_b.to(b.dtype)
    return result


def rank_fill_seed(train_seed: int, version: int, module: str) -> int:
    """The ``fill_seed`` of ``factors_for_site_rank`` for one module at one global version.

    Site and coordinator both derive it, so the coordinator reconstructs exactly the factors a
    site with its own rank started from.
    """
    digest = sum((i + 1) * b for i, b in enumerate(module.encode()))
    return (train_seed * 1_000_003 + version * 7_919 + digest) % (2**31 - 1)
