"""int8-block and int4 (per-block bf16 scales) and ``decode_delta_flat``: error bounds, sizes,
and malformed payloads rejected with ``UpdateRejected``."""

from __future__ import annotations

import json
from typing import Any

import pytest
import safetensors.torch
import torch

from common.adapters import AdapterState, state_shapes
from common.block_quant import block_count, pack_int4, unpack_int4
from common.encoding import (
    BLOCK_ENCODINGS,
    DELTA_FORMAT,
    Encoding,
    decode_delta,
    decode_delta_flat,
    encode_delta,
    max_encoded_size,
)
from common.errors import UpdateRejected
from common.streaming import FlatLayout

MAX_BYTES = 2**24


def realistic_delta() -> AdapterState:
    """30 layers x (A, B) of a rank-8 LoRA on a 576-wide model (SmolLM2's q_proj)."""
    gen = torch.Generator().manual_seed(0)
    delta: AdapterState = {}
    for layer in range(30):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        delta[f"{prefix}.lora_A.weight"] = torch.randn(8, 576, generator=gen) * 1e-3
        delta[f"{prefix}.lora_B.weight"] = torch.randn(576, 8, generator=gen) * 1e-4
    return delta


def ragged_delta() -> AdapterState:
    """Sizes that are not multiples of any block, one of them odd; a zero and an empty tensor."""
    gen = torch.Generator().manual_seed(1)
    return {
        "z.lora_B.weight": torch.randn(3, 5, generator=gen),
        "a.lora_A.weight": torch.randn(129, generator=gen) * 1e-5,
        "m.zero": torch.zeros(70),
        "m.empty": torch.zeros(0, 4),
        "m.big": torch.randn(2, 100, generator=gen) * 1e3,
    }


@pytest.mark.parametrize("encoding", ["int8-block", "int4"])
@pytest.mark.parametrize("make", [realistic_delta, ragged_delta])
def test_error_is_at_most_half_a_step_of_its_block(encoding: Encoding, make: Any) -> None:
    delta = make()
    levels, block = BLOCK_ENCODINGS[encoding]
    decoded = decode_delta(encode_delta(delta, encoding), MAX_BYTES, state_shapes(delta))
    assert list(decoded) == list(delta)
    for key, x in delta.items():
        assert decoded[key].dtype == torch.float32 and decoded[key].shape == x.shape
        flat, got = x.reshape(-1).double(), decoded[key].reshape(-1).double()
        for start in range(0, flat.numel(), block):
            part = flat[start : start + block]
            # The scale is max|x| / levels rounded up to bf16: at most 2**-7 larger.
            step = float(part.abs().max()) / levels * (1 + 2**-7)
            error = float((got[start : start + block] - part).abs().max())
            assert error <= step / 2 * (1 + 1e-6) + 1e-30, (key, start)
    if "m.zero" in delta:
        assert torch.equal(decoded["m.zero"], torch.zeros(70))


def test_relative_error_on_a_realistic_delta() -> None:
    delta = realistic_delta()
    layout = FlatLayout(state_shapes(delta))
    reference = layout.flatten(delta).double()
    errors = {}
    for encoding in ("int8", "int8-block", "int4"):
        flat = decode_delta_flat(encode_delta(delta, encoding), MAX_BYTES, layout).double()
        errors[encoding] = float((flat - reference).norm() / reference.norm())
    # Gaussian values: per-block scales beat per-tensor; 15 levels cost ~10 %.
    assert errors["int8-block"] < errors["int8"] < 0.01
    assert errors["int4"] < 0.15


def test_sizes_meet_the_issue_14_targets() -> None:
    delta = realistic_delta()
    fp32 = len(encode_delta(delta, "fp32"))
    int8_block = len(encode_delta(delta, "int8-block"))
    int4 = len(encode_delta(delta, "int4"))
    assert int8_block <= 0.26 * fp32
    assert int4 <= 0.14 * fp32
    for encoding, size in (("int8-block", int8_block), ("int4", int4)):
        assert size <= max_encoded_size(state_shapes(delta), encoding)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int8-block", "int4"])
def test_flat_decode_equals_the_named_decode(encoding: Encoding) -> None:
    delta = ragged_delta()
    payload = encode_delta(delta, encoding)
    layout = FlatLayout(state_shapes(delta))
    named = decode_delta(payload, MAX_BYTES, state_shapes(delta))
    out = torch.full((layout.numel,), float("nan"))
    flat = decode_delta_flat(payload, MAX_BYTES, layout, out)
    assert flat.data_ptr() == out.data_ptr()
    assert torch.equal(flat, layout.flatten(named))


def test_flat_decode_of_tensors_stored_out_of_name_order() -> None:
    """A valid safetensors payload may order its data differently; offsets are honoured."""
    a, b = torch.arange(3, dtype=torch.float32), torch.arange(10, 14, dtype=torch.float32)
    header = {
        "__metadata__": {"format": DELTA_FORMAT, "encoding": "fp32"},
        "a": {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
    }
    raw = json.dumps(header).encode()
    payload = len(raw).to_bytes(8, "little") + raw + b.numpy().tobytes() + a.numpy().tobytes()
    layout = FlatLayout({"b": (4,), "a": (3,)})
    assert torch.equal(decode_delta_flat(payload, MAX_BYTES, layout), torch.cat([a, b]))
    overlapping = payload.replace(b"[16, 28]", b"[12, 24]")
    with pytest.raises(UpdateRejected, match="overlap or leave a gap"):
        decode_delta_flat(overlapping, MAX_BYTES, layout)


def test_flat_decode_checks_the_layout_and_the_output_buffer() -> None:
    delta = ragged_delta()
    payload = encode_delta(delta, "fp16")
    wrong = FlatLayout({**state_shapes(delta), "m.zero": (71,)})
    with pytest.raises(UpdateRejected, match=r"'m\.zero' has shape"):
        decode_delta_flat(payload, MAX_BYTES, wrong)
    with pytest.raises(ValueError, match="expected float32"):
        decode_delta_flat(payload, MAX_BYTES, FlatLayout(state_shapes(delta)), torch.empty(3))


def test_int4_packing_round_trips_odd_lengths() -> None:
    codes = torch.tensor([-7, 7, 0, 3, -1], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert torch.equal(unpack_int4(packed, 5), codes)
    spoiled = packed.clone()
    spoiled[-1] |= 0xF0
    with pytest.raises(UpdateRejected, match="padding nibble"):
        unpack_int4(spoiled, 5)
    with pytest.raises(UpdateRejected, match="expected 3"):
        unpack_int4(packed[:2], 5)


# --- malformed payloads ------------------------------------------------------------------------

SHAPES = {"w": (2, 64)}


def crafted(
    encoding: str = "int8-block",
    codes: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    **metadata: Any,
) -> bytes:
    """A block payload built by hand: 128 codes of 1 and two scales of 0.5 unless told."""
    if codes is None:
        codes = torch.ones(128, dtype=torch.int8)
        if encoding == "int4":
            codes = pack_int4(codes)
    if scales is None:
        scales = torch.full((block_count([128], 64),), 0.5, dtype=torch.bfloat16)
    fields = {
        "format": DELTA_FORMAT,
        "encoding": encoding,
        "block": "64",
        "layout": json.dumps([["w", [2, 64]]]),
    }
    fields.update({k: v for k, v in metadata.items() if v is not None})
    for key in [k for k, v in metadata.items() if v is None]:
        del fields[key]
    tensors = {"codes": codes, "scales": scales, **(extra or {})}
    return safetensors.torch.save(tensors, metadata=fields)


@pytest.mark.parametrize("encoding", ["int8-block", "int4"])
def test_a_crafted_payload_decodes(encoding: str) -> None:
    decoded = decode_delta(crafted(encoding), MAX_BYTES, SHAPES)
    assert torch.equal(decoded["w"], torch.full((2, 64), 0.5))


def _scales(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            lambda: crafted(codes=torch.ones(127, dtype=torch.int8)),
            "127 bytes of codes, its layout needs 128",
        ),
        (lambda: crafted(codes=torch.ones(129, dtype=torch.int8)), "129 bytes of codes"),
        (
            lambda: crafted("int4", codes=torch.ones(65, dtype=torch.uint8)),
            "65 bytes of codes, its layout needs 64",
        ),
        (lambda: crafted(scales=_scales(1.0)), "1 block scales, its layout needs 2"),
        (lambda: crafted(scales=_scales(1.0, 1.0, 1.0)), "3 block scales"),
        (
            lambda: crafted(scales=_scales(1.0, float("nan"))),
            "1 of 2 block scales are negative, NaN",
        ),
        (
            lambda: crafted(scales=_scales(float("inf"), 1.0)),
            "block scales are negative, NaN or inf",
        ),
        (lambda: crafted(scales=_scales(-0.5, 1.0)), "block scales are negative"),
        (
            lambda: crafted(
                codes=torch.full((128,), 127, dtype=torch.int8), scales=_scales(3e38, 1)
            ),
            r"non-finite values \(0 NaN, 64 Inf\)",
        ),
        (lambda: crafted(scales=torch.ones(2, dtype=torch.float16)), "'scales' has dtype 'F16'"),
        (lambda: crafted(codes=torch.ones(128, dtype=torch.uint8)), "'codes' has dtype 'U8'"),
        (
            lambda: crafted("int4", codes=torch.ones(128, dtype=torch.int8)),
            "'codes' has dtype 'I8'",
        ),
        (lambda: crafted(extra={"w": torch.zeros(1)}), "expected exactly"),
        (lambda: crafted(block="48"), "block size '48'"),
        (lambda: crafted(block="0"), "block size '0'"),
        (lambda: crafted(block="-64"), "block size '-64'"),
        (lambda: crafted(block="1" * 40), "block size"),
        (lambda: crafted(block=None), "block size None"),
        (lambda: crafted(layout=None), "no valid layout"),
        (lambda: crafted(layout="{"), "no valid layout"),
        (lambda: crafted(layout='{"w": [2, 64]}'), "layout is not a JSON list"),
        (lambda: crafted(layout='[["w", [2, -64]]]'), "bad layout entry"),
        (lambda: crafted(layout='[["w", [2, true]]]'), "bad layout entry"),
        (lambda: crafted(layout='[["w"]]'), "bad layout entry"),
        (lambda: crafted(layout='[["w", [1, 64]], ["w", [1, 64]]]'), "strictly increasing"),
        (lambda: crafted(layout='[["x", [64]], ["w", [64]]]'), "strictly increasing"),
        (lambda: crafted(layout='[["w", [2, 64]], ["x", [0]]]'), "unexpected \\['x'\\]"),
        (lambda: crafted(layout='[["w", [1099511627776, 1099511627776]]]'), "'w' has shape"),
        (lambda: crafted(scales_note="x"), r"unexpected metadata keys \['scales_note'\]"),
    ],
)
def test_malformed_block_payload_is_rejected(payload: Any, message: str) -> None:
    with pytest.raises(UpdateRejected, match=message):
        decode_delta(payload(), MAX_BYTES, SHAPES)
    with pytest.raises(UpdateRejected, match=message):
        decode_delta_flat(payload(), MAX_BYTES, FlatLayout(SHAPES))


def test_oversized_counts_are_rejected_without_allocating() -> None:
    """A layout claiming 2**80 values is compared with the codes' bytes, never allocated."""
    payload = crafted(layout='[["w", [1099511627776, 1099511627776]]]')
    with pytest.raises(UpdateRejected, match="bytes of codes, its layout needs"):
        decode_delta(payload, MAX_BYTES)


@pytest.mark.parametrize("encoding", ["int8-block", "int4"])
def test_every_truncation_of_a_block_payload_is_rejected(encoding: Encoding) -> None:
    payload = encode_delta(ragged_delta(), encoding)
    layout = FlatLayout(state_shapes(ragged_delta()))
    for length in range(0, len(payload), max(1, len(payload) // 300)):
        with pytest.raises(UpdateRejected):
            decode_delta_flat(payload[:length], MAX_BYTES, layout)


def test_a_block_payload_over_the_bound_is_rejected_before_parsing() -> None:
    payload = encode_delta(realistic_delta(), "int4")
    with pytest.raises(UpdateRejected, match="over the bound"):
        decode_delta(payload, len(payload) - 1)
