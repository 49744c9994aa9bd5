"""int8-block and int4 payloads: one ``codes`` tensor, one ``scales`` tensor, a JSON layout.

Metadata beside ``format`` and ``encoding``: ``block`` (values per block, a power of two from 8
to 4096) and ``layout`` (the delta's tensors as ``[[name, shape], ...]`` in strictly increasing
name order). ``codes`` holds the quantised values of every tensor concatenated in layout order
(int8, or uint8 with two int4 codes each) and ``scales`` one bfloat16 per block
(``common.block_quant``). One header entry per payload instead of one per tensor keeps the
header small: int8-block is 0.257 x fp32 for SmolLM2's q,v adapter, int4 0.137.

Decoding checks, before it allocates anything of the payload's choosing: the block size, the
layout (names, order, shapes), that the codes and scales have exactly the bytes the layout
needs, that every scale is finite and >= 0, and that every decoded value is finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from common.adapters import check_shapes
from common.block_quant import (
    INT4_LEVELS,
    INT8_LEVELS,
    block_count,
    check_scales,
    dequantise_blocks,
    pack_int4,
    quantise_blocks,
    unpack_int4,
)
from common.errors import UpdateRejected
from common.payload_format import (
    LENGTH_PREFIX_BYTES,
    data_spans,
    data_start,
    output_vector,
    quote,
    refuse_duplicates,
    tensor_at,
)
from common.streaming import FlatLayout, check_flat_values

# Encodings with per-block scales: (largest |code|, values per block written by the encoder).
# int4 uses smaller blocks: with 15 levels one outlier costs its block more precision.
BLOCK_ENCODINGS: dict[str, tuple[int, int]] = {
    "int8-block": (INT8_LEVELS, 128),
    "int4": (INT4_LEVELS, 64),
}
# Block sizes a decoder accepts: powers of two, so that no block count is unreasonably large.
BLOCK_SIZES = frozenset(2**k for k in range(3, 13))
META_BLOCK = "block"
META_LAYOUT = "layout"
CODES, SCALES = "codes", "scales"
BLOCK_HEADER_DTYPES = {"int8-block": "I8", "int4": "U8"}


def encode_blocks(
    delta: Mapping[str, torch.Tensor], encoding: str, metadata: dict[str, str]
) -> bytes:
    """The ``codes`` + ``scales`` payload of a block encoding, tensors in sorted name order."""
    levels, block = BLOCK_ENCODINGS[encoding]
    names = sorted(delta)
    parts = [delta[k].detach().to(device="cpu", dtype=torch.float64).reshape(-1) for k in names]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    codes, scales = quantise_blocks(flat, [p.numel() for p in parts], block, levels)
    if encoding == "int4":
        codes = pack_int4(codes)
    layout = [[name, list(delta[name].shape)] for name in names]
    metadata[META_BLOCK] = str(block)
    metadata[META_LAYOUT] = json.dumps(layout, separators=(",", ":"))
    return safetensors.torch.save({CODES: codes, SCALES: scales}, metadata=metadata)


def read_layout(metadata: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The ``layout`` metadata: names strictly increasing, shapes of non-negative ints."""
    try:
        entries = json.loads(metadata[META_LAYOUT], object_pairs_hook=refuse_duplicates)
    except (KeyError, ValueError, TypeError, RecursionError) as err:
        raise UpdateRejected(f"block-encoded delta payload has no valid layout ({err})") from err
    if not isinstance(entries, list):
        raise UpdateRejected("block-encoded delta payload: layout is not a JSON list")
    shapes: dict[str, tuple[int, ...]] = {}
    previous = None
    for entry in entries:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        shape = entry[1] if ok else None
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise UpdateRejected(f"block-encoded delta payload: bad layout entry {quote(entry)}")
        if previous is not None and entry[0] <= previous:
            raise UpdateRejected(
                f"block-encoded delta payload: layout name {quote(entry[0])} is not after "
                f"{quote(previous)} (names must be strictly increasing)"
            )
        previous = entry[0]
        shapes[entry[0]] = tuple(shape)
    return shapes


def read_block(metadata: dict[str, Any]) -> int:
    """The ``block`` metadata: a decimal power of two in ``BLOCK_SIZES``."""
    text = metadata.get(META_BLOCK)
    block = int(text) if isinstance(text, str) and text.isdigit() and len(text) <= 5 else 0
    if block not in BLOCK_SIZES:
        raise UpdateRejected(
            f"block-encoded delta payload: block size {quote(text)}, expected a power of two "
            f"from {min(BLOCK_SIZES)} to {max(BLOCK_SIZES)}"
        )
    return block


def decode_blocks(
    payload: bytes,
    header: dict[str, Any],
    metadata: dict[str, Any],
    encoding: str,
    expected: Mapping[str, tuple[int, ...]] | None,
    out: torch.Tensor | None = None,
) -> tuple[FlatLayout, torch.Tensor]:
    """The payload's layout and its values as one float32 vector in that (sorted) order.

    Raises
    ------
    UpdateRejected
        A bad block size or layout, names or shapes other than ``expected``, entries other
        than ``codes`` and ``scales``, byte counts that do not match the layout, a negative or
        non-finite scale, or a decoded value that is not finite.
    """
    block = read_block(metadata)
    shapes = read_layout(metadata)
    if expected is not None:
        check_shapes(shapes, expected, what="decoded delta")
    if set(header) != {CODES, SCALES}:
        raise UpdateRejected(
            f"block-encoded delta payload holds entries {quote(sorted(header))[:100]}, "
            f"expected exactly {[CODES, SCALES]}"
        )
    start = data_start(payload)
    dtypes = {CODES: BLOCK_HEADER_DTYPES[encoding], SCALES: "BF16"}
    spans = data_spans(header, dtypes, len(payload) - start)
    sizes = [math.prod(shape) for shape in shapes.values()]
    count = sum(sizes)
    code_bytes = count if encoding == "int8-block" else -(-count // 2)
    if spans[CODES][1] - spans[CODES][0] != code_bytes:
        raise UpdateRejected(
            f"{encoding} payload holds {spans[CODES][1] - spans[CODES][0]} bytes of codes, "
            f"its layout needs {code_bytes}"
        )
    blocks = block_count(sizes, block)
    if spans[SCALES][1] - spans[SCALES][0] != 2 * blocks:
        raise UpdateRejected(
            f"{encoding} payload holds {(spans[SCALES][1] - spans[SCALES][0]) // 2} block "
            f"scales, its layout needs {blocks}"
        )
    scales = check_scales(tensor_at(payload, start, spans[SCALES], "BF16"))
    codes = tensor_at(payload, start, spans[CODES], dtypes[CODES])
    if encoding == "int4":
        codes = unpack_int4(codes, count)
    layout = FlatLayout(shapes)
    flat = output_vector(out, count)
    dequantise_blocks(codes, scales, sizes, block, flat)
    check_flat_values(flat, count, what="decoded delta")
    return layout, flat


def max_block_payload_size(expected: Mapping[str, tuple[int, ...]], encoding: str) -> int:
    """An upper bound on a block payload's size for deltas of these shapes (bytes)."""
    block = BLOCK_ENCODINGS[encoding][1]
    sizes = [math.prod(shape) for shape in expected.values()]
    codes = sum(sizes) if encoding == "int8-block" else -(-sum(sizes) // 2)
    total = LENGTH_PREFIX_BYTES + 1024 + codes + 2 * block_count(sizes, block) + 2 * 256
    # Layout entry per tensor: the name escaped twice (JSON in a JSON string) and its shape.
    return total + sum(16 * len(n.encode("utf-8")) + 24 * len(s) for n, s in expected.items())
