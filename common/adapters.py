"""Adapter state arithmetic: deltas, their validation, and FedAvg of LoRA factors.

An adapter state is what ``peft.get_peft_model_state_dict`` returns: a ``dict[str, Tensor]``
of LoRA factors (``...lora_A.weight`` of shape (r, k), ``...lora_B.weight`` of shape (d, r))
and possibly ``modules_to_save`` tensors such as a classifier head. A delta is a state of the
same keys and shapes holding ``trained - received``.

Every function here is pure (no I/O, no Flower), checks keys, shapes and dtypes before any
arithmetic, and raises ``UpdateRejected`` naming the offending key for a delta that cannot be
used, or ``AggregationError`` when a whole round cannot be aggregated.

FedAvg of factors is biased: peft's ``get_delta_weight`` defines a LoRA weight as
``B @ A * scaling``, and mean(B) @ mean(A) != mean(B @ A) unless every site shares the same A
(FFA-LoRA). ``lora_product`` computes that product so the tests can show both facts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from common.errors import FedloraError, UpdateRejected

AdapterState = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]

# How many key names an error message lists before summarising: a hostile reply may carry
# thousands of keys, and the message ends up in logs and metrics.jsonl.
_MAX_NAMED_KEYS = 5
# Longest rendering of one key name in a message (characters); a hostile name may be megabytes.
_MAX_QUOTED_CHARS = 100


class AggregationError(FedloraError):
    """A round cannot be aggregated at all: no deltas, or no positive total weight."""


def state_shapes(state: Mapping[str, torch.Tensor]) -> Shapes:
    """Map every tensor name of ``state`` to its shape.

    Parameters
    ----------
    state
        An adapter state or delta.

    Returns
    -------
    Shapes
        ``{name: shape}``, the manifest ``check_shapes`` and ``decode_delta`` compare against.
    """
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _quote(name: str) -> str:
    """``repr(name)`` for an error message, cut to ``_MAX_QUOTED_CHARS``."""
    text = repr(name)
    return text if len(text) <= _MAX_QUOTED_CHARS else text[:_MAX_QUOTED_CHARS] + "..."


def _name_keys(keys: set[str]) -> str:
    """Render a set of key names for an error message, at most ``_MAX_NAMED_KEYS`` of them."""
    names = sorted(keys)
    shown = ", ".join(_quote(name) for name in names[:_MAX_NAMED_KEYS])
    hidden = len(names) - _MAX_NAMED_KEYS
    return f"[{shown}, ... (+{hidden} more)]" if hidden > 0 else f"[{shown}]"


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    what: str = "delta",
) -> None:
    """Check that two manifests have exactly the same keys and shapes.

    Parameters
    ----------
    shapes
        ``{name: shape}`` of the tensors received.
    expected
        ``{name: shape}`` they must match.
    what
        What the tensors are, for the message ("delta", "decoded delta", ...).

    Raises
    ------
    UpdateRejected
        Naming the missing and unexpected keys, or the first key whose shape differs with
        the expected and the actual shape.
    """
    missing = set(expected) - set(shapes)
    extra = set(shapes) - set(expected)
    if missing or extra:
        parts = [f"missing {_name_keys(missing)}"] if missing else []
        parts += [f"unexpected {_name_keys(extra)}"] if extra else []
        raise UpdateRejected(f"{what} keys differ from the reference: {'; '.join(parts)}")
    for key, want in expected.items():
        got = tuple(shapes[key])
        if got != tuple(want):
            raise UpdateRejected(
                f"{what} tensor {_quote(key)} has shape {got}, expected {tuple(want)}"
            )


def check_values(state: Mapping[str, torch.Tensor], what: str = "delta") -> None:
    """Check that every tensor is floating point and holds only finite values.

    Raises
    ------
    UpdateRejected
        Naming the first key whose dtype is not floating point or that holds NaN or Inf.
    """
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise UpdateRejected(
                f"{what} tensor {_quote(key)} has dtype {tensor.dtype}, "
                "expected a floating-point dtype"
            )
        if not bool(torch.isfinite(tensor).all()):
            nans = int(torch.isnan(tensor).sum())
            infs = int(torch.isinf(tensor).sum())
            raise UpdateRejected(
                f"{what} tensor {_quote(key)} holds non-finite values ({nans} NaN, {infs} Inf)"
            )


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of a delta over all of its tensors, accumulated in float64.

    Returns
    -------
    float
        ``sqrt(sum over tensors and elements of x**2)``; 0.0 for an empty delta.
    """
    squares = 0.0
    for tensor in delta.values():
        # float64 per tensor so that sums over millions of float32 elements do not lose digits.
        squares += float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(squares)


def check_delta(
    delta: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
) -> None:
    """Check that a delta can be applied to ``reference`` and is within the norm bound.

    Parameters
    ----------
    delta
        The delta a site sent.
    reference
        The state it must match: same keys, same shapes.
    max_norm
        Largest accepted global L2 norm (``delta_norm``); ``None`` for no bound.

    Raises
    ------
    UpdateRejected
        If the key sets differ (naming the keys), a shape differs (naming key, expected and
        actual shape), a tensor is not floating point or holds NaN/Inf (naming the key), or
        the norm exceeds ``max_norm`` (giving both).
    """
    check_shapes(state_shapes(delta), state_shapes(reference))
    check_values(delta)
    check_norm(delta, max_norm)


def check_norm(delta: Mapping[str, torch.Tensor], max_norm: float | None) -> None:
    """Check that ``delta_norm(delta)`` is at most ``max_norm`` (``None``: no bound).

    Raises
    ------
    UpdateRejected
        Giving the norm and the bound.
    """
    if max_norm is not None:
        norm = delta_norm(delta)
        if norm > max_norm:
            raise UpdateRejected(f"delta L2 norm {norm:.6g} exceeds the bound {max_norm:.6g}")


def compute_delta(
    trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
) -> AdapterState:
    """Compute ``trained - received`` per key, in float32.

    Parameters
    ----------
    trained
        The adapter state after local training.
    received
        The global state training started from.

    Returns
    -------
    AdapterState
        Float32 tensors on ``trained``'s devices, in ``received``'s key order.

    Raises
    ------
    UpdateRejected
        If keys or shapes differ, or a tensor is not floating point.
    """
    check_shapes(state_shapes(trained), state_shapes(received), what="trained state")
    check_values(trained, what="trained state")
    check_values(received, what="received state")
    delta: AdapterState = {}
    for key, start in received.items():
        end = trained[key].detach().to(torch.float32)
        delta[key] = end - start.detach().to(device=end.device, dtype=torch.float32)
    return delta


def apply_delta(
    state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], lr: float = 1.0
) -> AdapterState:
    """Compute ``state + lr * delta`` as a new state of ``state``'s dtypes.

    Parameters
    ----------
    state
        The state to move (left unchanged).
    delta
        The step; validated against ``state`` with ``check_delta``.
    lr
        Server learning rate; 1.0 makes aggregate-then-apply plain FedAvg.

    Returns
    -------
    AdapterState
        Computed in float32, cast back to each tensor's dtype in ``state``.
    """
    check_delta(delta, state)
    result: AdapterState = {}
    for key, tensor in state.items():
        base = tensor.detach().to(torch.float32)
        step = delta[key].detach().to(device=base.device, dtype=torch.float32)
        result[key] = torch.add(base, step, alpha=lr).to(tensor.dtype)
    return result


def _fractions(num_deltas: int, weights: Sequence[float]) -> list[float]:
    """Normalise aggregation weights to fractions summing to one (float64)."""
    if num_deltas == 0:
        raise AggregationError("no deltas to aggregate: the round has no accepted replies")
    if len(weights) != num_deltas:
        raise AggregationError(f"{num_deltas} deltas but {len(weights)} weights")
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise AggregationError(f"weights[{index}] is {weight}, expected a finite number >= 0")
    try:
        total = math.fsum(weights)
    except OverflowError:
        raise AggregationError("the weights' sum overflows float64") from None
    if total <= 0:
        raise AggregationError(f"total weight is {total}, expected > 0")
    return [float(weight) / total for weight in weights]


def aggregate_fedavg(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> AdapterState:
    """Weighted mean of each tensor separately (FedIT: A and B averaged on their own).

    Sum-only, so it also works under secure aggregation. Biased for the LoRA product; see the
    module docstring.

    Parameters
    ----------
    deltas
        One delta per site, all with the keys and shapes of ``deltas[0]``.
    weights
        One weight per site (examples or tokens), >= 0; normalised to sum to one.

    Returns
    -------
    AdapterState
        Float32 tensors on ``deltas[0]``'s devices. Accumulation is one running float64 sum,
        so memory beyond the inputs is one adapter in float64 plus one tensor temporary.

    Raises
    ------
    AggregationError
        No deltas, a length mismatch, a negative or non-finite weight, or zero total weight.
    UpdateRejected
        ``deltas[i]`` does not match ``deltas[0]`` or holds non-finite values (names ``i``).
    """
    fractions = _fractions(len(deltas), weights)
    reference = deltas[0]
    total = {
        key: torch.zeros(tensor.shape, dtype=torch.float64, device=tensor.device)
        for key, tensor in reference.items()
    }
    for index, (delta, fraction) in enumerate(zip(deltas, fractions, strict=True)):
        try:
            check_delta(delta, reference)
        except UpdateRejected as err:
            raise UpdateRejected(f"deltas[{index}] of {len(deltas)}: {err}") from err
        for key, running in total.items():
            term = delta[key].detach().to(device=running.device, dtype=torch.float64)
            running.add_(term, alpha=fraction)
    return {key: running.to(torch.float32) for key, running in total.items()}


def lora_product(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense weight change of one LoRA pair, ``b @ a * scaling`` (peft's ``get_delta_weight``).

    Parameters
    ----------
    a
        ``lora_A`` factor, shape (r, k).
    b
        ``lora_B`` factor, shape (d, r).
    scaling
        ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).

    Returns
    -------
    torch.Tensor
        Shape (d, k). Layers with ``fan_in_fan_out`` store its transpose.

    Raises
    ------
    UpdateRejected
        If the factors are not 2-D or their ranks differ.
    """
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise UpdateRejected(
            f"LoRA factors do not compose: B has shape {tuple(b.shape)}, A has shape "
            f"{tuple(a.shape)}; expected B (d, r) and A (r, k)"
        )
    return (b @ a) * scaling


def num_parameters(state: Mapping[str, torch.Tensor]) -> int:
    """Number of scalar entries over all tensors of ``state``."""
    return sum(tensor.numel() for tensor in state.values())


def state_num_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors of ``state`` occupy in their own dtypes (numel * element size)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())
