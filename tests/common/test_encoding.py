"""Roundtrip, size and negative tests for common.encoding (in the style of pyca's test_hpke.py)."""

from __future__ import annotations

import json
import math
import random
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

from common.adapters import AdapterState, state_shapes
from common.encoding import (
    DELTA_FORMAT,
    MAX_HEADER_BYTES,
    Encoding,
    decode_delta,
    encode_delta,
    encoded_size,
    max_encoded_size,
)
from common.errors import ConfigError, UpdateRejected

# Generous payload bound for the small deltas below (bytes).
MAX_BYTES = 2**24
HIDDEN = 576
RANK = 8


def small_delta(seed: int = 0) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.lora_A.weight": torch.randn(2, 3, generator=gen) * 0.01,
        "layer.lora_B.weight": torch.randn(3, 2, generator=gen) * 0.01,
    }


def realistic_delta() -> AdapterState:
    """30 layers x (A, B) of a rank-8 LoRA on a 576-wide model: 60 tensors, peft names."""
    gen = torch.Generator().manual_seed(0)
    delta: AdapterState = {}
    for layer in range(30):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        delta[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=gen) * 1e-3
        delta[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=gen) * 1e-3
    return delta


def craft(tensors: dict[str, torch.Tensor], **metadata: str) -> bytes:
    """A safetensors payload with arbitrary tensors and metadata, bypassing encode_delta."""
    base = {"format": DELTA_FORMAT, "encoding": "fp32"}
    return safetensors.torch.save(tensors, metadata={**base, **metadata})


def header_length(payload: bytes) -> int:
    return int.from_bytes(payload[:8], "little")


# --- roundtrips ------------------------------------------------------------------------------


def test_fp32_roundtrip_is_exact() -> None:
    delta = realistic_delta()
    decoded = decode_delta(encode_delta(delta, "fp32"), MAX_BYTES, state_shapes(delta))
    assert list(decoded) == list(delta)
    for key, tensor in delta.items():
        assert decoded[key].dtype == torch.float32
        assert torch.equal(decoded[key], tensor)


def test_fp32_roundtrip_accepts_other_float_dtypes_and_empty_tensors() -> None:
    delta = {"half": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "empty": torch.zeros(0, 4)}
    decoded = decode_delta(encode_delta(delta), MAX_BYTES)
    assert torch.equal(decoded["half"], torch.tensor([1.5, -2.0]))
    assert decoded["empty"].shape == (0, 4)


def test_fp16_roundtrip_within_half_precision() -> None:
    delta = realistic_delta()
    decoded = decode_delta(encode_delta(delta, "fp16"), MAX_BYTES, state_shapes(delta))
    for key, tensor in delta.items():
        assert decoded[key].dtype == torch.float32
        # float16: 11 significant bits (relative 2**-11), subnormals spaced 2**-24 apart.
        np.testing.assert_allclose(decoded[key].numpy(), tensor.numpy(), rtol=2**-11, atol=2**-25)


def test_fp16_refuses_values_beyond_its_range() -> None:
    delta = {"big": torch.tensor([1.0, 70000.0])}
    with pytest.raises(UpdateRejected, match=r"'big' holds \|x\| up to 70000, beyond"):
        encode_delta(delta, "fp16")
    encode_delta({"ok": torch.tensor([65504.0])}, "fp16")


def test_int8_error_is_at_most_half_a_step() -> None:
    delta = realistic_delta()
    delta["spiky"] = torch.tensor([[1e-6, -3.0, 2.5, 0.0, 1.0 / 3.0]])
    decoded = decode_delta(encode_delta(delta, "int8"), MAX_BYTES, state_shapes(delta))
    for key, tensor in delta.items():
        x = tensor.double().numpy()
        scale = np.abs(x).max() / 127
        error = np.abs(decoded[key].double().numpy() - x)
        # scale / 2 from rounding, plus the float32 rounding of the decoded value.
        assert error.max() <= scale / 2 + np.abs(x).max() * 2**-24, key


def test_int8_known_answer() -> None:
    payload = encode_delta({"w": torch.tensor([-127.0, 0.4, 0.6, 63.5, 127.0])}, "int8")
    decoded = decode_delta(payload, MAX_BYTES)
    # scale = 127 / 127 = 1: round-half-to-even sends 63.5 to 64.
    assert decoded["w"].tolist() == [-127.0, 0.0, 1.0, 64.0, 127.0]
    wire = safetensors.torch.load(payload)["w"]
    assert wire.dtype == torch.int8


def test_int8_all_zero_tensor() -> None:
    payload = encode_delta({"zero": torch.zeros(3, 4), "empty": torch.zeros(0)}, "int8")
    header = json.loads(payload[8 : 8 + header_length(payload)])
    assert json.loads(header["__metadata__"]["scales"]) == {"zero": 1.0, "empty": 1.0}
    decoded = decode_delta(payload, MAX_BYTES)
    assert torch.equal(decoded["zero"], torch.zeros(3, 4))


def test_unknown_encoding_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'int2'"):
        encode_delta(small_delta(), "int2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\['fp32'\]"):
        encode_delta(small_delta(), ["fp32"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ({"w": torch.tensor([1.0, math.nan])}, r"'w' holds non-finite values \(1 NaN"),
        ({"w": torch.tensor([math.inf])}, r"'w' holds non-finite values \(0 NaN, 1 Inf"),
        ({"w": torch.tensor([1, 2])}, "'w' has dtype torch.int64"),
        ({"__metadata__": torch.zeros(1)}, "reserved"),
    ],
)
def test_encode_refuses_unusable_deltas(delta: AdapterState, message: str) -> None:
    with pytest.raises(UpdateRejected, match=message):
        encode_delta(delta, "fp32")


# --- sizes -----------------------------------------------------------------------------------


def test_payload_sizes_shrink_with_the_encoding() -> None:
    delta = realistic_delta()
    data_bytes = 60 * RANK * HIDDEN * 4
    fp32 = encoded_size(delta, "fp32")
    fp16 = encoded_size(delta, "fp16")
    int8 = encoded_size(delta, "int8")
    assert data_bytes < fp32 < data_bytes * 1.02  # header is under 2 % of the data
    assert 0.49 < fp16 / fp32 < 0.51
    assert 0.24 < int8 / fp32 < 0.27  # int8 header also carries 60 scales


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int8-block", "int4"])
def test_max_encoded_size_bounds_the_payload(encoding: Encoding) -> None:
    for delta in (realistic_delta(), small_delta(), {"x" * 300: torch.zeros(1)}):
        bound = max_encoded_size(state_shapes(delta), encoding)
        assert encoded_size(delta, encoding) <= bound
        decode_delta(encode_delta(delta, encoding), bound, state_shapes(delta))


# --- negatives: every failure is UpdateRejected and nothing else -----------------------------


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int8-block", "int4"])
def test_every_truncation_is_rejected(encoding: Encoding) -> None:
    payload = encode_delta(small_delta(), encoding)
    for length in range(len(payload)):
        with pytest.raises(UpdateRejected):
            decode_delta(payload[:length], MAX_BYTES)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int8-block", "int4"])
def test_every_flipped_header_byte_is_rejected(encoding: Encoding) -> None:
    delta = small_delta()
    payload = encode_delta(delta, encoding)
    # XOR 0xFF makes any ASCII byte invalid UTF-8 and any length byte wrong: never decodable.
    for index in range(8 + header_length(payload)):
        tampered = bytearray(payload)
        tampered[index] ^= 0xFF
        with pytest.raises(UpdateRejected):
            decode_delta(bytes(tampered), MAX_BYTES, state_shapes(delta))


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int8-block", "int4"])
def test_random_bit_flips_raise_nothing_but_update_rejected(encoding: Encoding) -> None:
    delta = small_delta()
    payload = encode_delta(delta, encoding)
    rng = random.Random(0)
    for _ in range(300):
        tampered = bytearray(payload)
        tampered[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
        try:
            decoded = decode_delta(bytes(tampered), MAX_BYTES, state_shapes(delta))
        except UpdateRejected:
            continue
        # A flip in the data or in a digit can decode: integrity is the envelope's job.
        assert state_shapes(decoded) == state_shapes(delta)
        assert all(bool(torch.isfinite(t).all()) for t in decoded.values())


@pytest.mark.parametrize("declared", [2**64 - 1, 2**40, MAX_HEADER_BYTES + 1, 10_000])
def test_huge_declared_header_length_is_rejected(declared: int) -> None:
    payload = encode_delta(small_delta())
    tampered = declared.to_bytes(8, "little") + payload[8:]
    with pytest.raises(UpdateRejected, match=f"declared header length {declared} bytes"):
        decode_delta(tampered, MAX_BYTES)


def test_header_over_the_fixed_bound_is_rejected_even_if_present() -> None:
    payload = (MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b" " * (MAX_HEADER_BYTES + 1)
    with pytest.raises(UpdateRejected, match=f"at most {MAX_HEADER_BYTES} bytes"):
        decode_delta(payload, 2**26)


def test_garbage_is_rejected() -> None:
    rng = random.Random(1)
    for length in (1, 7, 8, 9, 64, 1000, 4096):
        with pytest.raises(UpdateRejected):
            decode_delta(rng.randbytes(length), MAX_BYTES)
    # A plausible length prefix followed by garbage reaches the JSON parser.
    for length in (16, 100, 1000):
        garbage = length.to_bytes(8, "little") + rng.randbytes(length + 24)
        with pytest.raises(UpdateRejected, match="malformed delta payload"):
            decode_delta(garbage, MAX_BYTES)


@pytest.mark.parametrize(
    "header",
    [
        b"[1, 2, 3]",
        b"[" * 100_000,  # deep nesting: RecursionError inside json
        b'{"__metadata__": {"format": "fedlora-delta/1", "encoding": "fp32"}, "w": 3}',
        b'{"__metadata__": {"format": "fedlora-delta/1", "encoding": "fp32"},'
        b' "w": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',
        b'{"__metadata__": {"format": "fedlora-delta/1", "encoding": "fp32"},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"__metadata__": {"format": "fedlora-delta/1", "encoding": "fp32"},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}}',
        b'{"__metadata__": {"format": "fedlora-delta/1", "encoding": "fp32"},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
        b'{"__metadata__": {"format": "fedlora-delta/1", "encoding": "fp32"},'
        b' "w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}}',
        b'{"__metadata__": {"format": "fedlora-delta/1", "encoding": ["fp32"]},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"__metadata__": {"format": "fedlora-delta/1", "encoding": "int8", "scales": {}},'
        b' "w": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}',
        b'{"__metadata__": "fp32", "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    ],
    ids=[
        "array",
        "deep",
        "entry",
        "bool-shape",
        "duplicate",
        "past-end",
        "reversed",
        "overflow",
        "list-encoding",
        "object-scales",
        "string-metadata",
    ],
)
def test_hand_written_bad_headers_are_rejected(header: bytes) -> None:
    payload = len(header).to_bytes(8, "little") + header + b"\x00" * 4
    with pytest.raises(UpdateRejected):
        decode_delta(payload, MAX_BYTES)


def test_empty_payload_is_rejected() -> None:
    with pytest.raises(UpdateRejected, match="0 bytes, shorter than"):
        decode_delta(b"", MAX_BYTES)


def test_non_bytes_payload_is_rejected() -> None:
    with pytest.raises(UpdateRejected, match="delta payload is str, expected bytes"):
        decode_delta("not bytes", MAX_BYTES)  # type: ignore[arg-type]


def test_payload_over_max_bytes_is_rejected() -> None:
    payload = encode_delta(small_delta())
    decode_delta(payload, len(payload))
    with pytest.raises(UpdateRejected, match=f"{len(payload)} bytes, over the bound of"):
        decode_delta(payload, len(payload) - 1)


def test_wrong_expected_shape_is_rejected() -> None:
    payload = encode_delta(small_delta())
    expected = {"layer.lora_A.weight": (2, 4), "layer.lora_B.weight": (3, 2)}
    with pytest.raises(UpdateRejected, match=r"'layer.lora_A.weight' has shape \(2, 3\), expected"):
        decode_delta(payload, MAX_BYTES, expected)


def test_unexpected_and_missing_keys_are_rejected() -> None:
    delta = small_delta()
    delta["head.weight"] = torch.zeros(2)
    expected = state_shapes(small_delta())
    with pytest.raises(UpdateRejected, match=r"unexpected \['head.weight'\]"):
        decode_delta(encode_delta(delta), MAX_BYTES, expected)
    expected["other.weight"] = (1,)
    with pytest.raises(UpdateRejected, match=r"missing \['other.weight'\]"):
        decode_delta(encode_delta(small_delta()), MAX_BYTES, expected)


@pytest.mark.parametrize(
    ("value", "count"), [(math.nan, "1 NaN, 0 Inf"), (-math.inf, "0 NaN, 1 Inf")]
)
def test_non_finite_value_injected_after_encoding_is_rejected(value: float, count: str) -> None:
    payload = bytearray(encode_delta({"w": torch.ones(4)}))
    data_start = 8 + header_length(bytes(payload))
    payload[data_start + 4 : data_start + 8] = struct.pack("<f", value)
    with pytest.raises(UpdateRejected, match=rf"'w' holds non-finite values \({count}\)"):
        decode_delta(bytes(payload), MAX_BYTES)


def test_int8_scale_that_overflows_float32_is_rejected() -> None:
    payload = craft(
        {"w": torch.tensor([127], dtype=torch.int8)},
        encoding="int8",
        scales=json.dumps({"w": 1e300}),
    )
    with pytest.raises(UpdateRejected, match=r"'w' holds non-finite values \(0 NaN, 1 Inf\)"):
        decode_delta(payload, MAX_BYTES)


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        (None, "has no 'scales' metadata"),
        ("not json", "malformed scales"),
        ("[1.0]", "not a JSON object"),
        ('{"v": 1.0}', r"missing \['w'\]; unexpected \['v'\]"),
        ('{"w": 1.0, "v": 1.0}', r"unexpected \['v'\]"),
        ('{"w": "1.0"}', "expected a number"),
        ('{"w": true}', "expected a number"),
        ('{"w": 0.0}', "expected finite and > 0"),
        ('{"w": -0.5}', "expected finite and > 0"),
        ('{"w": NaN}', "expected finite and > 0"),
        ('{"w": Infinity}', "expected finite and > 0"),
        ('{"w": 1.0, "w": 2.0}', "duplicate key"),
    ],
)
def test_bad_int8_scales_are_rejected(scales: str | None, message: str) -> None:
    metadata = {"encoding": "int8"} if scales is None else {"encoding": "int8", "scales": scales}
    payload = craft({"w": torch.tensor([1, -1], dtype=torch.int8)}, **metadata)
    with pytest.raises(UpdateRejected, match=message):
        decode_delta(payload, MAX_BYTES)


@pytest.mark.parametrize(
    ("tensor", "encoding"),
    [
        (torch.zeros(2, dtype=torch.float16), "fp32"),
        (torch.zeros(2, dtype=torch.float64), "fp32"),
        (torch.zeros(2, dtype=torch.int8), "fp32"),
        (torch.zeros(2, dtype=torch.float32), "fp16"),
        (torch.zeros(2, dtype=torch.bfloat16), "fp16"),
        (torch.zeros(2, dtype=torch.float32), "int8"),
        (torch.zeros(2, dtype=torch.uint8), "int8"),
    ],
)
def test_dtype_other_than_the_encodings_is_rejected(tensor: torch.Tensor, encoding: str) -> None:
    scales = {"scales": '{"w": 1.0}'} if encoding == "int8" else {}
    payload = craft({"w": tensor}, encoding=encoding, **scales)
    with pytest.raises(
        UpdateRejected, match=rf"'w' has dtype .*, expected .* encoding '{encoding}'"
    ):
        decode_delta(payload, MAX_BYTES)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"encoding": "int2"}, "unknown delta encoding 'int2'"),
        ({"encoding": ""}, "unknown delta encoding ''"),
        ({"format": "fedlora-delta/2"}, "format is 'fedlora-delta/2', expected 'fedlora-delta/1'"),
        ({"format": "pytorch"}, "format is 'pytorch'"),
        ({"note": "hello"}, r"unexpected metadata keys \['note'\]"),
        ({"scales": "{}"}, r"unexpected metadata keys \['scales'\]"),
    ],
)
def test_bad_metadata_is_rejected(metadata: dict[str, str], message: str) -> None:
    with pytest.raises(UpdateRejected, match=message):
        decode_delta(craft({"w": torch.zeros(2)}, **metadata), MAX_BYTES)


def test_missing_metadata_is_rejected() -> None:
    payload = safetensors.torch.save({"w": torch.zeros(2)})
    with pytest.raises(UpdateRejected, match="no fedlora metadata"):
        decode_delta(payload, MAX_BYTES)


def test_decode_returns_expected_order_and_fresh_tensors() -> None:
    delta = small_delta()
    expected = dict(reversed(list(state_shapes(delta).items())))
    decoded = decode_delta(encode_delta(delta), MAX_BYTES, expected)
    assert list(decoded) == list(expected)
    decoded["layer.lora_A.weight"].add_(1.0)  # writable, owns its memory


def test_site_report_round_trips_and_refuses_anything_else() -> None:
    from common import protocol as P
    from common.errors import UpdateRejected

    values = dict.fromkeys(P.REPORT_KEYS, 2.5) | {P.METRIC_EXAMPLES: 40}
    assert P.parse_report(P.report_bytes(values)) == values
    bad = [
        b"not json",
        P.report_bytes({**values, "extra": 1}),  # a key the coordinator did not ask for
        P.report_bytes({k: v for k, v in values.items() if k != P.METRIC_EXAMPLES}),
        P.report_bytes({**values, P.METRIC_TRAIN_LOSS: "low"}),
        P.report_bytes({**values, P.METRIC_STEPS: True}),
        P.report_bytes(values).replace(b"2.5", b"NaN", 1),
        b" " * (P.MAX_REPORT_BYTES + 1),
    ]
    for data in bad:
        with pytest.raises(UpdateRejected, match="site report"):
            P.parse_report(data)
