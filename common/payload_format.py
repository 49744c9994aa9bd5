"""The safetensors container of a delta payload: bounded header parsing and data spans.

A payload is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape,
data offsets, plus a ``__metadata__`` map of strings) and the raw little-endian tensor data.
Everything here checks sizes before it parses or allocates, and raises ``UpdateRejected`` for
every malformed input; ``common.encoding`` and ``common.block_encoding`` build on it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from common.errors import UpdateRejected

DELTA_FORMAT = "fedlora-delta/1"  # a site's update (up-link)
# The coordinator's step from one global version to the next (down-link, common.downlink): a
# difference of two published versions, tagged apart so that neither is taken for the other.
STEP_FORMAT = "fedlora-global-step/1"
META_FORMAT = "format"
META_ENCODING = "encoding"
# Largest JSON header accepted (bytes): about 100 000 tensor entries, far beyond any adapter,
# and small enough that parsing a hostile header costs little memory or time.
MAX_HEADER_BYTES = 16 * 2**20
# Bytes of the little-endian u64 that opens every safetensors payload.
LENGTH_PREFIX_BYTES = 8
# safetensors reserves this header key for the metadata map.
METADATA_KEY = "__metadata__"
# Longest rendering of a value taken from a payload in a message (characters): a hostile
# header may hold megabyte-long strings, and messages end up in logs and metrics.jsonl.
MAX_QUOTED_CHARS = 100
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}
TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
}


def quote(value: object) -> str:
    """``repr(value)`` for an error message, cut to ``MAX_QUOTED_CHARS``."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a repeated key could be read differently by two parsers."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {quote(key)}")
        result[key] = value
    return result


def read_header(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Bound the payload and its header length, then parse the JSON header."""
    if not isinstance(payload, bytes):
        raise UpdateRejected(f"delta payload is {type(payload).__name__}, expected bytes")
    if len(payload) > max_bytes:
        raise UpdateRejected(
            f"delta payload is {len(payload)} bytes, over the bound of {max_bytes} bytes"
        )
    if len(payload) < LENGTH_PREFIX_BYTES:
        raise UpdateRejected(
            f"malformed delta payload: {len(payload)} bytes, shorter than the 8-byte header length"
        )
    header_len = int.from_bytes(payload[:LENGTH_PREFIX_BYTES], "little")
    bound = min(MAX_HEADER_BYTES, len(payload) - LENGTH_PREFIX_BYTES)
    if header_len > bound:
        raise UpdateRejected(
            f"malformed delta payload: declared header length {header_len} bytes, "
            f"at most {bound} bytes possible"
        )
    raw = payload[LENGTH_PREFIX_BYTES : LENGTH_PREFIX_BYTES + header_len]
    try:
        header = json.loads(raw, object_pairs_hook=refuse_duplicates)
    except (ValueError, RecursionError) as err:  # includes JSON and UTF-8 decoding errors
        raise UpdateRejected(f"malformed delta payload: header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise UpdateRejected("malformed delta payload: header is not a JSON object")
    return header


def data_spans(
    header: dict[str, Any], dtypes: Mapping[str, str], data_bytes: int
) -> dict[str, tuple[int, int]]:
    """Each entry's ``[begin, end)`` in the data section, checked to tile it exactly.

    ``dtypes`` maps each entry to its required safetensors dtype; the entry's shape and dtype
    give its length, so a payload whose offsets overlap, leave gaps or overrun is refused.
    """
    spans: dict[str, tuple[int, int]] = {}
    for key, dtype in dtypes.items():
        entry = header.get(key)
        bad = UpdateRejected(f"malformed delta payload: bad manifest entry for {quote(key)}")
        if not isinstance(entry, dict):
            raise bad
        offsets, shape = entry.get("data_offsets"), entry.get("shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not isinstance(shape, list):
            raise bad
        # ``type(n) is int`` also refuses bools; this loop runs per tensor of every reply.
        if not all(type(n) is int and n >= 0 for n in [*offsets, *shape]):
            raise bad
        if entry.get("dtype") != dtype:
            raise UpdateRejected(
                f"delta payload entry {quote(key)} has dtype {quote(entry.get('dtype'))}, "
                f"expected {dtype!r}"
            )
        length = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != length:
            raise UpdateRejected(
                f"malformed delta payload: {quote(key)} spans {offsets}, expected {length} bytes"
            )
        spans[key] = (offsets[0], offsets[1])
    cursor = 0
    for begin, end in sorted(spans.values()):
        if begin != cursor:
            raise UpdateRejected("malformed delta payload: data offsets overlap or leave a gap")
        cursor = end
    if cursor != data_bytes:
        raise UpdateRejected(
            f"malformed delta payload: tensors cover {cursor} bytes, the data section holds "
            f"{data_bytes}"
        )
    return spans


def tensor_at(payload: bytes, start: int, span: tuple[int, int], dtype: str) -> torch.Tensor:
    """A 1-D tensor over a copy of ``payload[start + span]`` (a copy: bytes are immutable)."""
    begin, end = start + span[0], start + span[1]
    if end == begin:
        return torch.zeros(0, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(bytearray(memoryview(payload)[begin:end]), dtype=TORCH_DTYPES[dtype])


def data_start(payload: bytes) -> int:
    return LENGTH_PREFIX_BYTES + int.from_bytes(payload[:LENGTH_PREFIX_BYTES], "little")


def output_vector(out: torch.Tensor | None, numel: int) -> torch.Tensor:
    """``out`` if it is a float32 vector of ``numel`` values, else a new one."""
    if out is None:
        return torch.empty(numel, dtype=torch.float32)
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != numel:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, expected float32 ({numel},)")
    return out
