"""Fixed-point arithmetic mod 2**32 for secure aggregation, and the adapter <-> vector mapping.

A real value ``y`` is sent as the signed integer level ``q = round(y * scale)``, stored as its
two's complement in a ``uint32`` (so the group is the integers mod 2**32 and masks can be added
with numpy's wrapping ``uint32`` arithmetic). If every site's level satisfies
``|q| <= max_level`` and ``num_sites * max_level <= 2**31 - 1``, the sum of the levels of any
subset of sites lies in ``[-(2**31 - 1), 2**31 - 1]``, so reading the masked-and-unmasked sum
back as ``int32`` recovers it exactly: there is no wrap-around, and no offset to subtract
(unlike Flower's ``quantization.py``, which shifts by the clipping range and so needs to know
how many sites were summed).

Rounding:

``nearest``
    ``np.rint`` (half to even). Error per site at most ``0.5 / scale``; deterministic, so
    the same delta always gives the same levels.
``stochastic``
    ``floor(y) + Bernoulli(frac(y))`` with an OS-seeded generator. Error per site below
    ``1 / scale`` but unbiased, so errors average out over rounds and sites.

Every function is pure (no I/O, no Flower) and checks its inputs before any arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import torch

from common.errors import FedloraError

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)

# Every level travels as a uint32: arithmetic is mod 2**32.
MODULUS = 2**32
# Largest |sum of levels| that reads back unambiguously as int32.
MAX_SUM_LEVEL = 2**31 - 1

# (tensor name, shape) in vector order; JSON-friendly so the lead can store it in a record.
Layout = tuple[tuple[str, tuple[int, ...]], ...]
Levels = npt.NDArray[np.uint32]
Floats = npt.NDArray[np.float64]


class FixedPointError(FedloraError):
    """A value cannot be encoded: non-finite, out of range, or a length does not match."""


def max_level(bound: float, scale: float) -> int:
    """Largest level a value of magnitude ``bound`` may take at ``scale`` steps per unit.

    Quantisation clips to ``±max_level`` after scaling, so float rounding in ``bound * scale``
    can never push a level past the overflow budget.
    """
    return math.floor(bound * scale)


def quantize(
    values: npt.NDArray[np.floating],
    scale: float,
    level_bound: int,
    rounding: Rounding = "nearest",
    rng: np.random.Generator | None = None,
) -> Levels:
    """Encode real values as signed fixed-point levels in ``uint32`` (two's complement).

    Parameters
    ----------
    values
        1-D real values (already clipped and weighted by the caller); must be finite.
    scale
        Steps per unit: the level of ``y`` is ``y * scale`` rounded.
    level_bound
        Levels are clipped to ``[-level_bound, level_bound]`` (see ``max_level``).
    rounding
        ``"nearest"`` or ``"stochastic"`` (see the module docstring).
    rng
        Generator for stochastic rounding; ``None`` draws one seeded from the OS.

    Returns
    -------
    numpy.ndarray
        ``uint32`` levels mod 2**32, same length as ``values``.

    Raises
    ------
    FixedPointError
        If ``values`` is not 1-D or holds NaN/Inf, or ``level_bound`` exceeds ``MAX_SUM_LEVEL``.
    """
    if values.ndim != 1:
        raise FixedPointError(f"values must be a 1-D array, got shape {values.shape}")
    if not 0 <= level_bound <= MAX_SUM_LEVEL:
        raise FixedPointError(f"level bound {level_bound} outside [0, {MAX_SUM_LEVEL}]")
    if not bool(np.isfinite(values).all()):
        raise FixedPointError(f"values hold {int((~np.isfinite(values)).sum())} NaN/Inf")
    scaled = np.clip(values.astype(np.float64) * scale, -level_bound, level_bound)
    if rounding == "nearest":
        levels = np.rint(scaled)
    elif rounding == "stochastic":
        gen = rng if rng is not None else np.random.default_rng()
        floor = np.floor(scaled)
        # Round up with probability equal to the fractional part: E[level] = scaled.
        levels = floor + (gen.random(scaled.shape) < scaled - floor)
    else:
        raise FixedPointError(f"rounding {rounding!r} is not one of {ROUNDINGS}")
    # Two's complement: the low 32 bits of the int64 level.
    return (levels.astype(np.int64) & (MODULUS - 1)).astype(np.uint32)


def dequantize_sum(total: Levels, scale: float) -> Floats:
    """Decode a sum of levels (mod 2**32) back to real values in float64.

    Correct as long as the true integer sum lies in ``±MAX_SUM_LEVEL``, which ``max_level``
    and the caller's parameters guarantee.
    """
    if total.dtype != np.uint32 or total.ndim != 1:
        raise FixedPointError(f"sum must be a 1-D uint32 array, got {total.dtype} {total.shape}")
    return total.view(np.int32).astype(np.float64) / scale


def flatten(state: Mapping[str, torch.Tensor]) -> tuple[npt.NDArray[np.float32], Layout]:
    """Concatenate an adapter state (or delta) into one float32 vector, tensors sorted by name.

    Parameters
    ----------
    state
        ``{name: tensor}``; every tensor floating point.

    Returns
    -------
    tuple
        The float32 vector and its layout ``((name, shape), ...)`` for ``unflatten``.
    """
    layout: list[tuple[str, tuple[int, ...]]] = []
    parts: list[npt.NDArray[np.float32]] = []
    for name in sorted(state):
        tensor = state[name]
        if not tensor.is_floating_point():
            raise FixedPointError(f"tensor {name!r} has dtype {tensor.dtype}, expected float")
        layout.append((name, tuple(tensor.shape)))
        parts.append(tensor.detach().to("cpu", torch.float32).reshape(-1).numpy())
    vector = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return vector.astype(np.float32, copy=False), tuple(layout)


def layout_size(layout: Sequence[tuple[str, Sequence[int]]]) -> int:
    """Number of coordinates a layout describes."""
    return sum(math.prod(shape) for _, shape in layout)


def unflatten(
    vector: npt.NDArray[np.floating],
    layout: Sequence[tuple[str, Sequence[int]]],
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Split a vector back into named tensors, the inverse of ``flatten``.

    Raises
    ------
    FixedPointError
        If the vector's length differs from the layout's number of coordinates.
    """
    expected = layout_size(layout)
    if vector.ndim != 1 or vector.shape[0] != expected:
        raise FixedPointError(
            f"vector has shape {vector.shape}, layout expects {expected} coordinates"
        )
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        part = torch.from_numpy(np.array(vector[offset : offset + size], dtype=np.float64))
        state[name] = part.reshape(tuple(shape)).to(dtype)
        offset += size
    return state
