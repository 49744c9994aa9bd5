"""Streaming aggregation: a running weighted sum over one flat vector, one reply at a time.

The list-based rules (``common.adapters.aggregate_fedavg`` and the rules built on it) take every
site's delta at once, so the coordinator holds N decoded adapters: O(N) memory. A sum-only rule
(``fedavg``, ``ffa``, ``fedsa``; see ``common.rules``) needs only ``sum_i w_i x_i`` and
``sum_i w_i``, so each reply can be decoded into one scratch vector, checked, added into one
preallocated accumulator and released: memory is one adapter (plus one scratch) whatever N is.
``exact`` and the robust rules (median, trimmed mean) need every delta and stay list-based.

Layout: the adapter's tensors concatenated in sorted name order (``FlatLayout``), which is
the order ``safetensors`` stores a single-dtype payload in, so a payload's data section can be
read into the vector in one copy.

Summation order and results: with ``total_weight`` given, each delta is added with the fraction
``w_i / total_weight``, exactly as ``aggregate_fedavg`` does; with a float64 accumulator and
the deltas added in the same order the result is bit-identical to the list version. A float32
accumulator (the default: a quarter of the memory traffic) agrees within float32 rounding.

A delta that fails a check raises ``UpdateRejected`` before the accumulator is touched, so a
rejected reply never changes the sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from common.adapters import (
    AdapterState,
    AggregationError,
    check_norm,
    check_shapes,
    state_shapes,
)
from common.errors import UpdateRejected


class FlatLayout:
    """Where each tensor of an adapter lives in one flat vector (sorted name order).

    Parameters
    ----------
    shapes
        ``{name: shape}``; its order is the order ``unflatten`` returns the tensors in.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in shapes.items()}
        self.order: tuple[str, ...] = tuple(sorted(self.shapes))
        self.offsets: dict[str, tuple[int, int]] = {}
        cursor = 0
        for name in self.order:
            size = math.prod(self.shapes[name])
            self.offsets[name] = (cursor, cursor + size)
            cursor += size
        self.numel = cursor

    def flatten(
        self, state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``state``'s tensors as one CPU vector in layout order (keys and shapes checked)."""
        check_shapes(state_shapes(state), self.shapes)
        out = torch.empty(self.numel, dtype=dtype)
        for name, (start, end) in self.offsets.items():
            out[start:end] = state[name].detach().reshape(-1)
        return out

    def unflatten(self, flat: torch.Tensor) -> AdapterState:
        """Views of ``flat`` shaped like the layout's tensors, in the layout's given order."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise UpdateRejected(
                f"flat delta has shape {tuple(flat.shape)}, expected ({self.numel},)"
            )
        return {
            name: flat[self.offsets[name][0] : self.offsets[name][1]].view(shape)
            for name, shape in self.shapes.items()
        }


def check_flat_values(flat: torch.Tensor, numel: int, what: str = "delta") -> None:
    """Check a flat delta: floating point, ``(numel,)`` and only finite values.

    ``aminmax`` reads the vector once (about a tenth of ``isfinite().all()``'s cost) and
    propagates NaN, so finite extremes mean every value is finite.

    Raises
    ------
    UpdateRejected
        Naming the dtype, the shape, or the count of NaN and Inf values.
    """
    if not flat.is_floating_point():
        raise UpdateRejected(f"{what} has dtype {flat.dtype}, expected a floating-point dtype")
    if flat.dim() != 1 or flat.numel() != numel:
        raise UpdateRejected(f"{what} has shape {tuple(flat.shape)}, expected ({numel},)")
    if numel == 0:
        return
    low, high = torch.aminmax(flat)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        nans, infs = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
        raise UpdateRejected(f"{what} holds non-finite values ({nans} NaN, {infs} Inf)")


def _check_weight(weight: float, what: str) -> None:
    if isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
        raise AggregationError(f"{what} is {weight!r}, expected a finite number >= 0")


class StreamingMean:
    """Weighted mean of deltas added one at a time into one flat accumulator.

    Parameters
    ----------
    layout
        The adapter's (or the rule's sent keys') layout.
    total_weight
        ``math.fsum`` of the weights that will be added, when known up front (the coordinator
        knows it once every reply is validated): each delta is then added with the fraction
        ``w_i / total_weight``, the arithmetic of ``aggregate_fedavg``. ``None``: add
        ``w_i x_i`` and divide by the sum of the weights at the end (within rounding of the
        list version, not bit-identical).
    dtype
        Accumulator dtype: ``torch.float32`` (default) or ``torch.float64`` (bit-identical to
        ``aggregate_fedavg`` when the deltas are added in the same order).
    max_norm
        Reject a delta whose ``delta_norm`` exceeds this; ``None`` for no bound.
    check
        A rule's payload check (``Rule.check_payload``), run on the delta's tensors before
        it is added.
    """

    def __init__(
        self,
        layout: FlatLayout,
        total_weight: float | None = None,
        dtype: torch.dtype = torch.float32,
        max_norm: float | None = None,
        check: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
    ) -> None:
        if total_weight is not None:
            _check_weight(total_weight, "total weight")
            if total_weight <= 0:
                raise AggregationError(f"total weight is {total_weight}, expected > 0")
        if dtype not in (torch.float32, torch.float64):
            raise AggregationError(f"accumulator dtype {dtype}, expected float32 or float64")
        self.layout = layout
        self.total_weight = total_weight
        self.max_norm = max_norm
        self.check = check
        self.weights: list[float] = []  # of the deltas added, in order
        self._sum = torch.zeros(layout.numel, dtype=dtype)

    @property
    def count(self) -> int:
        """How many deltas have been added."""
        return len(self.weights)

    def add(self, flat: torch.Tensor, weight: float) -> None:
        """Check one flat delta (layout order), then add it with its weight.

        Raises
        ------
        UpdateRejected
            Wrong shape or dtype, a non-finite value, a norm over ``max_norm`` or a failed
            rule check; the accumulator is left exactly as it was.
        AggregationError
            A negative or non-finite weight (the accumulator is left as it was).
        """
        _check_weight(weight, "weight")
        check_flat_values(flat, self.layout.numel)
        if self.max_norm is not None or self.check is not None:
            named = self.layout.unflatten(flat)
            check_norm(named, self.max_norm)  # per tensor, as check_delta: the same verdict
            if self.check is not None:
                self.check(named)
        alpha = weight if self.total_weight is None else float(weight) / self.total_weight
        if flat.dtype != self._sum.dtype:
            # Cast first: the same float64 operands and one add, as aggregate_fedavg does.
            flat = flat.to(self._sum.dtype)
        self._sum.add_(flat, alpha=alpha)
        self.weights.append(float(weight))

    def add_state(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """``add`` for a delta given as named tensors (keys and shapes checked)."""
        self.add(self.layout.flatten(delta, self._sum.dtype), weight)

    def flat_mean(self) -> torch.Tensor:
        """The weighted mean as one vector in the accumulator's dtype.

        Raises
        ------
        AggregationError
            Nothing added, a zero sum of weights, weights that do not add up to the declared
            ``total_weight``, or a mean that is not finite.
        """
        if not self.weights:
            raise AggregationError("no deltas to aggregate: the round has no accepted replies")
        added = math.fsum(self.weights)
        if self.total_weight is None:
            if added <= 0:
                raise AggregationError(f"total weight is {added}, expected > 0")
            mean = self._sum / added
        else:
            if not math.isclose(added, self.total_weight, rel_tol=1e-12):
                raise AggregationError(
                    f"the added weights sum to {added}, the declared total weight is "
                    f"{self.total_weight}: a delta was left out after the total was fixed"
                )
            mean = self._sum.clone()
        try:
            check_flat_values(mean, self.layout.numel, what="weighted mean")
        except UpdateRejected as err:
            raise AggregationError(str(err)) from None
        return mean

    def mean(self) -> AdapterState:
        """The weighted mean as float32 tensors with the layout's names and shapes."""
        flat = self.flat_mean().to(torch.float32)
        return {k: v.clone() for k, v in self.layout.unflatten(flat).items()}
