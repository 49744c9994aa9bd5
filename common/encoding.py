"""Delta encoding: an adapter delta as safetensors bytes in fp32, fp16, int8 or int4.

These are the bytes a site later seals (HPKE) or masks. The container is safetensors: an
8-byte little-endian header length, a JSON header (per tensor: dtype, shape, data offsets,
plus a ``__metadata__`` map of strings) and the raw little-endian tensor data. No pickle, so
decoding runs no code, and every size is checked before anything is parsed.

Metadata carried in the header:

``format``
    ``"fedlora-delta/1"``; any other value is refused.
``encoding``
    ``"fp32"``, ``"fp16"``, ``"int8"``, ``"int8-block"`` or ``"int4"``; in the first three
    every tensor must have that encoding's dtype.
``scales``
    int8 only: a JSON object ``{tensor name: scale}`` (the scales live in the header rather
    than as extra tensors, so the tensor names are exactly the delta's names).
``block``, ``layout``
    int8-block and int4 only: values per block (a power of two, 8..4096) and the delta's
    tensors as a JSON list ``[[name, shape], ...]`` in strictly increasing name order. These
    payloads hold exactly two tensors: ``codes`` (the quantised values of every tensor,
    concatenated in layout order: int8, or uint8 holding two int4 codes) and ``scales``
    (bfloat16, one per block); see ``common.block_encoding`` and ``common.block_quant``.

int8 is symmetric per-tensor quantisation: ``scale = max|x| / 127`` (1.0 for an all-zero
tensor), ``q = clamp(round(x / scale), -127, 127)``, decoded as ``q * scale``; the error per
element is at most ``scale / 2``. -128 is never used, so the grid is symmetric around zero.
fp16 refuses values beyond its range (|x| > 65504) rather than sending Inf; values below
6e-8 flush to zero, which is harmless for a delta.

Every decoding failure raises ``UpdateRejected`` and nothing else. The container parsing
shared by every encoding (bounded header, data spans) is ``common.payload_format``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import safetensors.torch
import torch
from safetensors import SafetensorError

from common.adapters import AdapterState, check_shapes, check_values, state_shapes
from common.block_encoding import (
    BLOCK_ENCODINGS,
    META_BLOCK,
    META_LAYOUT,
    decode_blocks,
    encode_blocks,
    max_block_payload_size,
)
from common.errors import ConfigError, UpdateRejected
from common.payload_format import (
    DELTA_FORMAT,
    DTYPE_BYTES,
    LENGTH_PREFIX_BYTES,
    MAX_HEADER_BYTES,
    META_ENCODING,
    META_FORMAT,
    METADATA_KEY,
    data_spans,
    data_start,
    output_vector,
    quote,
    read_header,
    refuse_duplicates,
    tensor_at,
)
from common.streaming import FlatLayout, check_flat_values

# Re-exported: importers of these names from here keep working.
__all__ = [
    "BLOCK_ENCODINGS",
    "DELTA_FORMAT",
    "ENCODINGS",
    "MAX_HEADER_BYTES",
    "META_ENCODING",
    "META_FORMAT",
    "META_SCALES",
    "Encoding",
    "decode_delta",
    "decode_delta_flat",
    "encode_delta",
    "encoded_size",
    "max_encoded_size",
]

Encoding = Literal["fp32", "fp16", "int8", "int8-block", "int4"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)
META_SCALES = "scales"
_INT8_LEVELS = 127

_WIRE_DTYPE: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.int8,
}
# The dtype names safetensors writes into the header for each encoding.
_HEADER_DTYPE = {"fp32": "F32", "fp16": "F16", "int8": "I8"}
_FP16_MAX = float(torch.finfo(torch.float16).max)


def _to_fp16(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Cast to float16, refusing values that would overflow to Inf."""
    wire = tensor.detach().to(device="cpu", dtype=torch.float16).contiguous()
    if not bool(torch.isfinite(wire).all()):
        peak = float(tensor.detach().abs().max())
        raise UpdateRejected(
            f"delta tensor {quote(key)} holds |x| up to {peak:.6g}, beyond the float16 range "
            f"({_FP16_MAX:g}); clip the delta or use the fp32 or int8 encoding"
        )
    return wire


def _quantise_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric per-tensor int8 quantisation; returns the codes and the scale."""
    # float64 so that x / scale lands within 1 ulp of the exact quotient: |error| <= scale / 2.
    values = tensor.detach().to(device="cpu", dtype=torch.float64)
    peak = float(values.abs().max()) if values.numel() else 0.0
    scale = peak / _INT8_LEVELS if peak > 0 else 1.0
    codes = torch.round(values / scale).clamp_(-_INT8_LEVELS, _INT8_LEVELS)
    return codes.to(torch.int8).contiguous(), scale


def encode_delta(
    delta: Mapping[str, torch.Tensor], encoding: Encoding = "fp32", fmt: str = DELTA_FORMAT
) -> bytes:
    """Serialise a delta into safetensors bytes with the given encoding.

    Parameters
    ----------
    delta
        Floating-point, finite tensors (any device, any float dtype).
    encoding
        ``"fp32"`` (exact), ``"fp16"`` (half the bytes), ``"int8"`` (a quarter, one scale
        per tensor), ``"int8-block"`` (a quarter, one scale per 128 values) or ``"int4"``
        (an eighth, one scale per 64 values).
    fmt
        The format tag: ``DELTA_FORMAT`` (a site's update) or ``STEP_FORMAT`` (the
        coordinator's step between two global versions).

    Returns
    -------
    bytes
        The payload; ``decode_delta`` reverses it.

    Raises
    ------
    ConfigError
        ``encoding`` is not one of ``ENCODINGS``.
    UpdateRejected
        A tensor is not floating point, holds NaN/Inf, is named ``__metadata__``, or (fp16)
        exceeds the float16 range; the message names the key.
    """
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise ConfigError(f"unknown delta encoding {quote(encoding)}, expected one of {ENCODINGS}")
    if METADATA_KEY in delta:
        raise UpdateRejected(f"delta tensor name {METADATA_KEY!r} is reserved by safetensors")
    check_values(delta)
    metadata = {META_FORMAT: fmt, META_ENCODING: encoding}
    if encoding in BLOCK_ENCODINGS:
        return encode_blocks(delta, encoding, metadata)
    tensors: dict[str, torch.Tensor] = {}
    if encoding == "int8":
        scales: dict[str, float] = {}
        for key, tensor in delta.items():
            tensors[key], scales[key] = _quantise_int8(tensor)
        # repr-exact JSON floats: the decoder multiplies by the very same float64 scale.
        metadata[META_SCALES] = json.dumps(scales, allow_nan=False)
    elif encoding == "fp16":
        tensors = {key: _to_fp16(key, tensor) for key, tensor in delta.items()}
    else:
        tensors = {
            key: tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
            for key, tensor in delta.items()
        }
    return safetensors.torch.save(tensors, metadata=metadata)


def encoded_size(delta: Mapping[str, torch.Tensor], encoding: Encoding) -> int:
    """Length in bytes of ``encode_delta(delta, encoding)``."""
    return len(encode_delta(delta, encoding))


def max_encoded_size(expected: Mapping[str, tuple[int, ...]], encoding: Encoding) -> int:
    """An upper bound on the payload size of a delta with these shapes, for ``max_bytes``.

    Data bytes are exact; the header allowance per tensor (bytes) covers its manifest entry
    and int8 scale even with every name character JSON-escaped twice.
    """
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise ConfigError(f"unknown delta encoding {quote(encoding)}, expected one of {ENCODINGS}")
    total = LENGTH_PREFIX_BYTES + 1024  # metadata and padding
    if encoding in BLOCK_ENCODINGS:
        return max_block_payload_size(expected, encoding)
    item_bytes = torch.empty((), dtype=_WIRE_DTYPE[encoding]).element_size()
    for name, shape in expected.items():
        total += math.prod(shape) * item_bytes
        total += 256 + 16 * len(name.encode("utf-8")) + 24 * len(shape)
    return total


def _read_encoding(metadata: Any, fmt: str = DELTA_FORMAT) -> str:
    """Check the format tag (``fmt``) and metadata keys; return the encoding name."""
    if not isinstance(metadata, dict):
        raise UpdateRejected("delta payload has no fedlora metadata (format, encoding)")
    tag = metadata.get(META_FORMAT)
    if tag != fmt:
        raise UpdateRejected(f"delta payload format is {quote(tag)}, expected {fmt!r}")
    encoding = metadata.get(META_ENCODING)
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise UpdateRejected(
            f"unknown delta encoding {quote(encoding)}, expected one of {ENCODINGS}"
        )
    allowed = {META_FORMAT, META_ENCODING} | ({META_SCALES} if encoding == "int8" else set())
    if encoding in BLOCK_ENCODINGS:
        allowed |= {META_BLOCK, META_LAYOUT}
    extra = set(metadata) - allowed
    if extra:
        names = ", ".join(quote(key) for key in sorted(extra)[:5])
        raise UpdateRejected(f"delta payload has unexpected metadata keys [{names}]")
    return encoding


def _read_manifest(header: dict[str, Any], encoding: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the header's tensor entries; every dtype must be the encoding's."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise UpdateRejected(f"malformed delta payload: bad manifest entry for {quote(key)}")
        if entry.get("dtype") != _HEADER_DTYPE[encoding]:
            raise UpdateRejected(
                f"delta tensor {quote(key)} has dtype {quote(entry.get('dtype'))}, expected "
                f"{_HEADER_DTYPE[encoding]!r} for encoding {encoding!r}"
            )
        shapes[key] = tuple(shape)
    return shapes


def _read_scales(metadata: dict[str, Any], names: Mapping[str, object]) -> dict[str, float]:
    """Parse and check the int8 scales: one finite positive number per tensor."""
    if META_SCALES not in metadata:
        raise UpdateRejected(f"int8 delta payload has no {META_SCALES!r} metadata")
    try:
        scales = json.loads(metadata[META_SCALES], object_pairs_hook=refuse_duplicates)
    except (ValueError, TypeError, RecursionError) as err:
        raise UpdateRejected(f"int8 delta payload has malformed scales ({err})") from err
    if not isinstance(scales, dict):
        raise UpdateRejected("int8 delta payload scales are not a JSON object")
    check_shapes(dict.fromkeys(scales, ()), dict.fromkeys(names, ()), what="int8 scales")
    for key, scale in scales.items():
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise UpdateRejected(f"int8 scale of {quote(key)} is {quote(scale)}, expected a number")
        if not math.isfinite(scale) or scale <= 0:
            raise UpdateRejected(
                f"int8 scale of {quote(key)} is {quote(scale)}, expected finite and > 0"
            )
    return {key: float(scale) for key, scale in scales.items()}


def _load_tensors(payload: bytes) -> dict[str, torch.Tensor]:
    """Let safetensors parse the data; any failure becomes ``UpdateRejected``."""
    try:
        return safetensors.torch.load(payload)
    except (SafetensorError, ValueError, RuntimeError, TypeError, KeyError, OverflowError) as err:
        raise UpdateRejected(f"malformed delta payload: {err}") from err


def decode_delta(
    payload: bytes,
    max_bytes: int,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    fmt: str = DELTA_FORMAT,
) -> AdapterState:
    """Parse a payload made by ``encode_delta`` back into float32 tensors, refusing bad input.

    Parameters
    ----------
    payload
        The bytes a site sent (after opening the envelope).
    max_bytes
        Largest accepted payload (bytes), checked before parsing; see ``max_encoded_size``.
    expected
        ``{name: shape}`` the delta must match exactly (the global adapter's manifest);
        ``None`` to accept any names and shapes.
    fmt
        The format tag the payload must carry (``DELTA_FORMAT``, or ``STEP_FORMAT`` for a
        down-link step): a global step is never accepted as a site's update, nor the reverse.

    Returns
    -------
    AdapterState
        Float32 CPU tensors, in ``expected``'s order if given, else sorted by name.

    Raises
    ------
    UpdateRejected
        For every failure: too large, malformed or truncated, wrong format tag or encoding,
        wrong dtype, bad int8 scales or block scales, a malformed layout, keys or shapes not
        as expected, NaN or Inf values.
    """
    header = read_header(payload, max_bytes)
    metadata = header.pop(METADATA_KEY, None)
    encoding = _read_encoding(metadata, fmt)
    if encoding in BLOCK_ENCODINGS:
        layout, flat = decode_blocks(payload, header, metadata, encoding, expected)
        views = layout.unflatten(flat)
        order = list(expected) if expected is not None else sorted(views)
        return {key: views[key].clone() for key in order}
    shapes = _read_manifest(header, encoding)
    if expected is not None:
        check_shapes(shapes, expected, what="decoded delta")
    scales = _read_scales(metadata, shapes) if encoding == "int8" else {}
    wire = _load_tensors(payload)
    # safetensors parsed the header itself; it must agree with what was checked above.
    check_shapes(state_shapes(wire), shapes, what="decoded delta")
    order = list(expected) if expected is not None else sorted(wire)
    delta: AdapterState = {}
    for key in order:
        if wire[key].dtype != _WIRE_DTYPE[encoding]:
            raise UpdateRejected(f"delta tensor {quote(key)} has dtype {wire[key].dtype}")
        if encoding == "int8":
            delta[key] = (wire[key].to(torch.float64) * scales[key]).to(torch.float32)
        else:
            # A copy: the loaded tensor may be a view of an immutable bytes buffer.
            delta[key] = wire[key].to(torch.float32, copy=True)
    check_values(delta, what="decoded delta")
    return delta


# -- any encoding into one flat vector (the coordinator's streaming sum) -------------------------


def decode_delta_flat(
    payload: bytes, max_bytes: int, layout: FlatLayout, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Parse a payload into one float32 vector in ``layout``'s order, refusing bad input.

    The same checks as ``decode_delta`` with ``expected = layout.shapes`` (and the same
    values: int8 decodes per tensor in float64 as there), but the data is read without one
    tensor object per entry: when the payload stores its tensors in sorted name order (every
    payload ``encode_delta`` writes), the data section is converted in one copy. ``out``: a
    float32 vector of ``layout.numel`` values to decode into (reused from reply to reply, it
    saves a fresh allocation's page faults, about 1 ms for SmolLM2's 1.8 MB); on a rejected
    payload its contents are undefined.

    Raises
    ------
    UpdateRejected
        For every failure, as ``decode_delta``.
    """
    header = read_header(payload, max_bytes)
    metadata = header.pop(METADATA_KEY, None)
    encoding = _read_encoding(metadata)
    if encoding in BLOCK_ENCODINGS:
        return decode_blocks(payload, header, metadata, encoding, layout.shapes, out)[1]
    shapes = _read_manifest(header, encoding)
    check_shapes(shapes, layout.shapes, what="decoded delta")
    scales = _read_scales(metadata, shapes) if encoding == "int8" else {}
    wire = _HEADER_DTYPE[encoding]
    start = data_start(payload)
    spans = data_spans(header, dict.fromkeys(shapes, wire), len(payload) - start)
    data = tensor_at(payload, start, (0, len(payload) - start), wire)
    item = DTYPE_BYTES[wire]
    out = output_vector(out, layout.numel)
    in_order = all(spans[k][0] == layout.offsets[k][0] * item for k in layout.order)
    if in_order and encoding != "int8":
        out.copy_(data)
    else:
        for key, (begin, end) in layout.offsets.items():
            part = data[spans[key][0] // item : spans[key][1] // item]
            if encoding == "int8":
                part = (part.to(torch.float64) * scales[key]).to(torch.float32)
            out[begin:end] = part
    check_flat_values(out, layout.numel, what="decoded delta")
    return out
