"""Symmetric quantisation with one scale per block of values: int8 and int4 codes, bf16 scales.

A flat vector is cut into blocks of ``block`` values that never straddle two tensors (each
tensor's last block may be shorter). Per block, ``scale = max|x| / levels`` rounded *up* to
bfloat16 (so no value needs clipping), and ``q = round(x / scale)`` clamped to
``[-levels, levels]``; a value decodes as ``q * scale``, so its error is at most ``scale / 2``.
``levels`` is 127 for int8 and 7 for int4. An all-zero block has scale 0.

Why bfloat16 scales: a LoRA delta's entries are often 1e-4..1e-2, so ``max|x| / 127`` lies
around 1e-6, where float16 is subnormal (its smallest normal is 6.1e-5) and keeps only a few
significant bits; bfloat16 has float32's exponent range with 8 significant bits, and rounding up
coarsens the grid by at most 0.8 %. ``q * scale`` is exact in float32 (8 x 8 significant bits).

int4 codes are stored offset by 8 (``q + 8`` in 1..15), two per byte, the even-indexed value in
the low nibble; a vector of odd length ends with a padding nibble of 8 (zero).

Every function is pure (no I/O) and works on CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from common.errors import UpdateRejected

INT8_LEVELS = 127
INT4_LEVELS = 7
_INT4_OFFSET = 8
_LOW_NIBBLE = 0x0F
# bfloat16 is the upper half of a float32's bits.
_BF16_DROPPED_BITS = 16


def block_count(sizes: Sequence[int], block: int) -> int:
    """Number of scales for tensors of ``sizes`` elements: ``sum ceil(n / block)``."""
    return sum(-(-n // block) for n in sizes)


def _round_up_to_bf16(values: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 values rounded up to the next bfloat16 (as float32)."""
    bits = values.contiguous().view(torch.int32).to(torch.int64)
    step = 1 << _BF16_DROPPED_BITS
    rounded = ((bits + step - 1) // step) * step
    return rounded.to(torch.int32).view(torch.float32)


def _block_scales(values: torch.Tensor, block: int, levels: int) -> torch.Tensor:
    """Per-block scales (float32 holding bf16 values) of one tensor's flat float64 values."""
    blocks = -(-values.numel() // block)
    padded = torch.zeros(blocks * block, dtype=torch.float64)
    padded[: values.numel()] = values.abs()
    peaks = padded.view(blocks, block).amax(dim=1)
    return _round_up_to_bf16((peaks / levels).to(torch.float32))


def quantise_blocks(
    flat: torch.Tensor, sizes: Sequence[int], block: int, levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, one per value) and bf16 scales of a flat vector cut into ``sizes``.

    Parameters
    ----------
    flat
        Finite floating-point values, the tensors concatenated (``sum(sizes)`` of them).
    sizes
        Element count of each tensor, in vector order.
    block
        Values per block (> 0).
    levels
        Largest |code|: ``INT8_LEVELS`` or ``INT4_LEVELS``.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``int8`` codes of ``flat``'s length and ``bfloat16`` scales, ``block_count`` of them.
    """
    values = flat.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    codes = torch.empty(values.numel(), dtype=torch.int8)
    scales: list[torch.Tensor] = []
    start = 0
    for size in sizes:
        part = values[start : start + size]
        scale = _block_scales(part, block, levels)
        per_value = scale.to(torch.float64).repeat_interleave(block)[:size]
        safe = torch.where(per_value > 0, per_value, torch.ones_like(per_value))
        codes[start : start + size] = (
            torch.round(part / safe).clamp_(-levels, levels).to(torch.int8)
        )
        scales.append(scale)
        start += size
    joined = torch.cat(scales) if scales else torch.zeros(0, dtype=torch.float32)
    return codes, joined.to(torch.bfloat16)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] as ``uint8``, two per byte (low nibble first, padded with 8)."""
    shifted = (codes.to(torch.int16) + _INT4_OFFSET).to(torch.uint8)
    if shifted.numel() % 2:
        shifted = torch.cat([shifted, torch.tensor([_INT4_OFFSET], dtype=torch.uint8)])
    pairs = shifted.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` codes (as ``int8``, -8..7) of ``pack_int4``'s bytes.

    Raises
    ------
    UpdateRejected
        The byte count is not ``ceil(count / 2)``, or the padding nibble is not 8.
    """
    if packed.numel() != -(-count // 2):
        raise UpdateRejected(
            f"int4 payload holds {packed.numel()} bytes of codes, expected {-(-count // 2)}"
        )
    nibbles = torch.empty(2 * packed.numel(), dtype=torch.uint8)
    nibbles[0::2] = packed & _LOW_NIBBLE
    nibbles[1::2] = packed >> 4
    if count % 2 and int(nibbles[-1]) != _INT4_OFFSET:
        raise UpdateRejected("int4 payload: the padding nibble after the last code is not 8")
    return (nibbles[:count].to(torch.int16) - _INT4_OFFSET).to(torch.int8)


def check_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales as float32 after checking that every one is finite and >= 0.

    Raises
    ------
    UpdateRejected
        Naming how many scales are negative, NaN or infinite.
    """
    values = scales.to(torch.float32)
    if values.numel() == 0:
        return values
    low, high = torch.aminmax(values)
    if not (float(low) >= 0 and math.isfinite(float(high))):
        bad = int((~torch.isfinite(values) | (values < 0)).sum())
        raise UpdateRejected(
            f"{bad} of {values.numel()} block scales are negative, NaN or infinite"
        )
    return values


def dequantise_blocks(
    codes: torch.Tensor, scales: torch.Tensor, sizes: Sequence[int], block: int, out: torch.Tensor
) -> None:
    """Write ``codes * scale`` (float32) into ``out``, blocks cut per tensor as in encoding.

    ``scales`` are float32 (``check_scales``); ``out`` has ``sum(sizes)`` elements. When
    every tensor is a whole number of blocks (every LoRA factor of a model whose widths are
    multiples of the block), the vector is scaled as one ``(blocks, block)`` view.
    """
    out.copy_(codes)
    if all(n % block == 0 for n in sizes):
        out.view(-1, block).mul_(scales.unsqueeze(1))
        return
    start = first = 0
    for size in sizes:
        full = size // block
        part = out[start : start + size]
        part[: full * block].view(-1, block).mul_(scales[first : first + full].unsqueeze(1))
        if size % block:
            part[full * block :].mul_(scales[first + full])
        start += size
        first += -(-size // block)
