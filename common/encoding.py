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
    (bfloat16, one per block); see ``common.block_quant``. One header entry per payload
    instead of one per tensor keeps the header small: int8-block is 0.257 x fp32 for
    SmolLM2's q,v adapter, int4 0.137 (``benchmarks/bench_communication.py``).

int8 is symmetric per-tensor quantisation: ``scale = max|x| / 127`` (1.0 for an all-zero
tensor), ``q = clamp(round(x / scale), -127, 127)``, decoded as ``q * scale``; the error per
element is at most ``scale / 2``. -128 is never used, so the grid is symmetric around zero.
fp16 refuses values beyond its range (|x| > 65504) rather than sending Inf; values below
6e-8 flush to zero, which is harmless for a delta.

Every decoding failure raises ``UpdateRejected`` and nothing else.
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
from common.errors import ConfigError, UpdateRejected
from common.streaming import FlatLayout, check_flat_values

Encoding = Literal["fp32", "fp16", "int8", "int8-block", "int4"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)
# Encodings with per-block scales: (largest |code|, values per block written by the encoder).
# int4 uses smaller blocks: with 15 levels one outlier costs its block more precision.
BLOCK_ENCODINGS: dict[str, tuple[int, int]] = {
    "int8-block": (INT8_LEVELS, 128),
    "int4": (INT4_LEVELS, 64),
}
# Block sizes a decoder accepts: powers of two, so that no block count is unreasonably large.
_BLOCK_SIZES = frozenset(2**k for k in range(3, 13))
META_BLOCK = "block"
META_LAYOUT = "layout"
_CODES, _SCALES = "codes", "scales"
_BLOCK_HEADER_DTYPES = {"int8-block": "I8", "int4": "U8"}

DELTA_FORMAT = "fedlora-delta/1"
META_FORMAT = "format"
META_ENCODING = "encoding"
META_SCALES = "scales"

# Largest JSON header accepted (bytes): about 100 000 tensor entries, far beyond any adapter,
# and small enough that parsing a hostile header costs little memory or time.
MAX_HEADER_BYTES = 16 * 2**20
# Bytes of the little-endian u64 that opens every safetensors payload.
_LENGTH_PREFIX_BYTES = 8
# safetensors reserves this header key for the metadata map.
_METADATA_KEY = "__metadata__"
_INT8_LEVELS = 127

_WIRE_DTYPE: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.int8,
}
# The dtype names safetensors writes into the header for each encoding.
_HEADER_DTYPE = {"fp32": "F32", "fp16": "F16", "int8": "I8"}
_FP16_MAX = float(torch.finfo(torch.float16).max)
# Longest rendering of a value taken from a payload in a message (characters): a hostile
# header may hold megabyte-long strings, and messages end up in logs and metrics.jsonl.
_MAX_QUOTED_CHARS = 100


def _quote(value: object) -> str:
    """``repr(value)`` for an error message, cut to ``_MAX_QUOTED_CHARS``."""
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED_CHARS else text[:_MAX_QUOTED_CHARS] + "..."


def _to_fp16(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Cast to float16, refusing values that would overflow to Inf."""
    wire = tensor.detach().to(device="cpu", dtype=torch.float16).contiguous()
    if not bool(torch.isfinite(wire).all()):
        peak = float(tensor.detach().abs().max())
        raise UpdateRejected(
            f"delta tensor {_quote(key)} holds |x| up to {peak:.6g}, beyond the float16 range "
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


def encode_delta(delta: Mapping[str, torch.Tensor], encoding: Encoding = "fp32") -> bytes:
    """Serialise a delta into safetensors bytes with the given encoding.

    Parameters
    ----------
    delta
        Floating-point, finite tensors (any device, any float dtype).
    encoding
        ``"fp32"`` (exact), ``"fp16"`` (half the bytes), ``"int8"`` (a quarter, one scale
        per tensor), ``"int8-block"`` (a quarter, one scale per 128 values) or ``"int4"``
        (an eighth, one scale per 64 values).

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
        raise ConfigError(f"unknown delta encoding {_quote(encoding)}, expected one of {ENCODINGS}")
    if _METADATA_KEY in delta:
        raise UpdateRejected(f"delta tensor name {_METADATA_KEY!r} is reserved by safetensors")
    check_values(delta)
    metadata = {META_FORMAT: DELTA_FORMAT, META_ENCODING: encoding}
    if encoding in BLOCK_ENCODINGS:
        return _encode_blocks(delta, encoding, metadata)
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
        raise ConfigError(f"unknown delta encoding {_quote(encoding)}, expected one of {ENCODINGS}")
    total = _LENGTH_PREFIX_BYTES + 1024  # metadata and padding
    if encoding in BLOCK_ENCODINGS:
        block = BLOCK_ENCODINGS[encoding][1]
        sizes = [math.prod(shape) for shape in expected.values()]
        codes = sum(sizes) if encoding == "int8-block" else -(-sum(sizes) // 2)
        total += codes + 2 * block_count(sizes, block) + 2 * 256
        # Layout entry per tensor: the name escaped twice (JSON in a JSON string) and its shape.
        return total + sum(16 * len(n.encode("utf-8")) + 24 * len(s) for n, s in expected.items())
    item_bytes = torch.empty((), dtype=_WIRE_DTYPE[encoding]).element_size()
    for name, shape in expected.items():
        total += math.prod(shape) * item_bytes
        total += 256 + 16 * len(name.encode("utf-8")) + 24 * len(shape)
    return total


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a repeated key could be read differently by two parsers."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_quote(key)}")
        result[key] = value
    return result


def _read_header(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Bound the payload and its header length, then parse the JSON header."""
    if not isinstance(payload, bytes):
        raise UpdateRejected(f"delta payload is {type(payload).__name__}, expected bytes")
    if len(payload) > max_bytes:
        raise UpdateRejected(
            f"delta payload is {len(payload)} bytes, over the bound of {max_bytes} bytes"
        )
    if len(payload) < _LENGTH_PREFIX_BYTES:
        raise UpdateRejected(
            f"malformed delta payload: {len(payload)} bytes, shorter than the 8-byte header length"
        )
    header_len = int.from_bytes(payload[:_LENGTH_PREFIX_BYTES], "little")
    bound = min(MAX_HEADER_BYTES, len(payload) - _LENGTH_PREFIX_BYTES)
    if header_len > bound:
        raise UpdateRejected(
            f"malformed delta payload: declared header length {header_len} bytes, "
            f"at most {bound} bytes possible"
        )
    raw = payload[_LENGTH_PREFIX_BYTES : _LENGTH_PREFIX_BYTES + header_len]
    try:
        header = json.loads(raw, object_pairs_hook=_refuse_duplicates)
    except (ValueError, RecursionError) as err:  # includes JSON and UTF-8 decoding errors
        raise UpdateRejected(f"malformed delta payload: header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise UpdateRejected("malformed delta payload: header is not a JSON object")
    return header


def _read_encoding(metadata: Any) -> str:
    """Check the format tag and metadata keys; return the encoding name."""
    if not isinstance(metadata, dict):
        raise UpdateRejected("delta payload has no fedlora metadata (format, encoding)")
    tag = metadata.get(META_FORMAT)
    if tag != DELTA_FORMAT:
        raise UpdateRejected(f"delta payload format is {_quote(tag)}, expected {DELTA_FORMAT!r}")
    encoding = metadata.get(META_ENCODING)
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise UpdateRejected(
            f"unknown delta encoding {_quote(encoding)}, expected one of {ENCODINGS}"
        )
    allowed = {META_FORMAT, META_ENCODING} | ({META_SCALES} if encoding == "int8" else set())
    if encoding in BLOCK_ENCODINGS:
        allowed |= {META_BLOCK, META_LAYOUT}
    extra = set(metadata) - allowed
    if extra:
        names = ", ".join(_quote(key) for key in sorted(extra)[:5])
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
            raise UpdateRejected(f"malformed delta payload: bad manifest entry for {_quote(key)}")
        if entry.get("dtype") != _HEADER_DTYPE[encoding]:
            raise UpdateRejected(
                f"delta tensor {_quote(key)} has dtype {_quote(entry.get('dtype'))}, expected "
                f"{_HEADER_DTYPE[encoding]!r} for encoding {encoding!r}"
            )
        shapes[key] = tuple(shape)
    return shapes


def _read_scales(metadata: dict[str, Any], names: Mapping[str, object]) -> dict[str, float]:
    """Parse and check the int8 scales: one finite positive number per tensor."""
    if META_SCALES not in metadata:
        raise UpdateRejected(f"int8 delta payload has no {META_SCALES!r} metadata")
    try:
        scales = json.loads(metadata[META_SCALES], object_pairs_hook=_refuse_duplicates)
    except (ValueError, TypeError, RecursionError) as err:
        raise UpdateRejected(f"int8 delta payload has malformed scales ({err})") from err
    if not isinstance(scales, dict):
        raise UpdateRejected("int8 delta payload scales are not a JSON object")
    check_shapes(dict.fromkeys(scales, ()), dict.fromkeys(names, ()), what="int8 scales")
    for key, scale in scales.items():
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise UpdateRejected(
                f"int8 scale of {_quote(key)} is {_quote(scale)}, expected a number"
            )
        if not math.isfinite(scale) or scale <= 0:
            raise UpdateRejected(
                f"int8 scale of {_quote(key)} is {_quote(scale)}, expected finite and > 0"
            )
    return {key: float(scale) for key, scale in scales.items()}


def _load_tensors(payload: bytes) -> dict[str, torch.Tensor]:
    """Let safetensors parse the data; any failure becomes ``UpdateRejected``."""
    try:
        return safetensors.torch.load(payload)
    except (SafetensorError, ValueError, RuntimeError, TypeError, KeyError, OverflowError) as err:
        raise UpdateRejected(f"malformed delta payload: {err}") from err


def decode_delta(
    payload: bytes, max_bytes: int, expected: Mapping[str, tuple[int, ...]] | None = None
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
    header = _read_header(payload, max_bytes)
    metadata = header.pop(_METADATA_KEY, None)
    encoding = _read_encoding(metadata)
    if encoding in BLOCK_ENCODINGS:
        layout, flat = _decode_blocks(payload, header, metadata, encoding, expected)
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
            raise UpdateRejected(f"delta tensor {_quote(key)} has dtype {wire[key].dtype}")
        if encoding == "int8":
            delta[key] = (wire[key].to(torch.float64) * scales[key]).to(torch.float32)
        else:
            # A copy: the loaded tensor may be a view of an immutable bytes buffer.
            delta[key] = wire[key].to(torch.float32, copy=True)
    check_values(delta, what="decoded delta")
    return delta


# -- int8-block and int4: one codes tensor and one scales tensor ---------------------------------


def _encode_blocks(
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
    return safetensors.torch.save({_CODES: codes, _SCALES: scales}, metadata=metadata)


def _read_layout(metadata: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The ``layout`` metadata: names strictly increasing, shapes of non-negative ints."""
    try:
        entries = json.loads(metadata[META_LAYOUT], object_pairs_hook=_refuse_duplicates)
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
            raise UpdateRejected(f"block-encoded delta payload: bad layout entry {_quote(entry)}")
        if previous is not None and entry[0] <= previous:
            raise UpdateRejected(
                f"block-encoded delta payload: layout name {_quote(entry[0])} is not after "
                f"{_quote(previous)} (names must be strictly increasing)"
            )
        previous = entry[0]
        shapes[entry[0]] = tuple(shape)
    return shapes


def _read_block(metadata: dict[str, Any]) -> int:
    text = metadata.get(META_BLOCK)
    block = int(text) if isinstance(text, str) and text.isdigit() and len(text) <= 5 else 0
    if block not in _BLOCK_SIZES:
        raise UpdateRejected(
            f"block-encoded delta payload: block size {_quote(text)}, expected a power of two "
            f"from {min(_BLOCK_SIZES)} to {max(_BLOCK_SIZES)}"
        )
    return block


def _data_spans(
    header: dict[str, Any], dtypes: Mapping[str, str], data_bytes: int
) -> dict[str, tuple[int, int]]:
    """Each entry's ``[begin, end)`` in the data section, checked to tile it exactly.

    ``dtypes`` maps each entry to its required safetensors dtype; the entry's shape and dtype
    give its length, so a payload whose offsets overlap, leave gaps or overrun is refused.
    """
    spans: dict[str, tuple[int, int]] = {}
    for key, dtype in dtypes.items():
        entry = header.get(key)
        bad = UpdateRejected(f"malformed delta payload: bad manifest entry for {_quote(key)}")
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
                f"delta payload entry {_quote(key)} has dtype {_quote(entry.get('dtype'))}, "
                f"expected {dtype!r}"
            )
        length = math.prod(shape) * _DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != length:
            raise UpdateRejected(
                f"malformed delta payload: {_quote(key)} spans {offsets}, expected {length} bytes"
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


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}
_TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
}


def _tensor_at(payload: bytes, start: int, span: tuple[int, int], dtype: str) -> torch.Tensor:
    """A 1-D tensor over a copy of ``payload[start + span]`` (a copy: bytes are immutable)."""
    begin, end = start + span[0], start + span[1]
    if end == begin:
        return torch.zeros(0, dtype=_TORCH_DTYPES[dtype])
    return torch.frombuffer(bytearray(memoryview(payload)[begin:end]), dtype=_TORCH_DTYPES[dtype])


def _data_start(payload: bytes) -> int:
    return _LENGTH_PREFIX_BYTES + int.from_bytes(payload[:_LENGTH_PREFIX_BYTES], "little")


def _decode_blocks(
    payload: bytes,
    header: dict[str, Any],
    metadata: dict[str, Any],
    encoding: str,
    expected: Mapping[str, tuple[int, ...]] | None,
    out: torch.Tensor | None = None,
) -> tuple[FlatLayout, torch.Tensor]:
    """The payload's layout and its values as one float32 vector in that (sorted) order."""
    block = _read_block(metadata)
    shapes = _read_layout(metadata)
    if expected is not None:
        check_shapes(shapes, expected, what="decoded delta")
    if set(header) != {_CODES, _SCALES}:
        raise UpdateRejected(
            f"block-encoded delta payload holds entries {_quote(sorted(header))[:100]}, "
            f"expected exactly {[_CODES, _SCALES]}"
        )
    start = _data_start(payload)
    dtypes = {_CODES: _BLOCK_HEADER_DTYPES[encoding], _SCALES: "BF16"}
    spans = _data_spans(header, dtypes, len(payload) - start)
    sizes = [math.prod(shape) for shape in shapes.values()]
    count = sum(sizes)
    code_bytes = count if encoding == "int8-block" else -(-count // 2)
    if spans[_CODES][1] - spans[_CODES][0] != code_bytes:
        raise UpdateRejected(
            f"{encoding} payload holds {spans[_CODES][1] - spans[_CODES][0]} bytes of codes, "
            f"its layout needs {code_bytes}"
        )
    blocks = block_count(sizes, block)
    if spans[_SCALES][1] - spans[_SCALES][0] != 2 * blocks:
        raise UpdateRejected(
            f"{encoding} payload holds {(spans[_SCALES][1] - spans[_SCALES][0]) // 2} block "
            f"scales, its layout needs {blocks}"
        )
    scales = check_scales(_tensor_at(payload, start, spans[_SCALES], "BF16"))
    codes = _tensor_at(payload, start, spans[_CODES], dtypes[_CODES])
    if encoding == "int4":
        codes = unpack_int4(codes, count)
    layout = FlatLayout(shapes)
    flat = _output(out, count)
    dequantise_blocks(codes, scales, sizes, block, flat)
    check_flat_values(flat, count, what="decoded delta")
    return layout, flat


# -- any encoding into one flat vector (the coordinator's streaming sum) -------------------------


def _output(out: torch.Tensor | None, numel: int) -> torch.Tensor:
    """``out`` if it is a float32 vector of ``numel`` values, else a new one."""
    if out is None:
        return torch.empty(numel, dtype=torch.float32)
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != numel:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, expected float32 ({numel},)")
    return out


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
    header = _read_header(payload, max_bytes)
    metadata = header.pop(_METADATA_KEY, None)
    encoding = _read_encoding(metadata)
    if encoding in BLOCK_ENCODINGS:
        return _decode_blocks(payload, header, metadata, encoding, layout.shapes, out)[1]
    shapes = _read_manifest(header, encoding)
    check_shapes(shapes, layout.shapes, what="decoded delta")
    scales = _read_scales(metadata, shapes) if encoding == "int8" else {}
    wire = _HEADER_DTYPE[encoding]
    start = _data_start(payload)
    spans = _data_spans(header, dict.fromkeys(shapes, wire), len(payload) - start)
    data = _tensor_at(payload, start, (0, len(payload) - start), wire)
    item = _DTYPE_BYTES[wire]
    out = _output(out, layout.numel)
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
