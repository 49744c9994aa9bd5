"""Property-based tests (hypothesis) of everything that parses input a site or a user controls:
the delta decoder, the sealed envelope, the config parser, the aggregation rules and the data
loaders.

Each property has the same shape: the function returns a well-formed result (finite tensors of
the expected shapes, a validated config, a non-empty dataset) or raises the one error type its
module documents. Any other exception is a crash of the coordinator or of a site, and fails.
Crashes these tests found are fixed; their regression tests are at the end, with
the inputs kept out of the properties' strategies so that the properties stay green.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.adapters import AggregationError, aggregate_fedavg
from common.allow_list import AllowList
from common.config import DataConfig, RunConfig, config_from_dict, load_config
from common.data import load_dataset
from common.encoding import ENCODINGS, decode_delta, encode_delta, max_encoded_size
from common.envelope import (
    HEADER,
    SIGNATURE_BYTES,
    SIGNATURE_DOMAIN,
    EnvelopeContext,
    max_envelope_bytes,
    open_delta,
    seal_delta,
)
from common.errors import ConfigError, DataError, UpdateRejected
from common.keys import CoordinatorPrivateKey
from common.rules import RULES, sum_only_aggregate

REPO = Path(__file__).resolve().parents[2]
# Moderate budgets: the whole file runs in well under a minute on two cores.
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Bound on a decoded payload (bytes); generous against the few-KB payloads generated here.
MAX_PAYLOAD = 1 << 20


# ---------------------------------------------------------------------------- strategies

NAMES = st.from_regex(r"[a-z][a-z0-9_.]{0,24}", fullmatch=True)
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
# Finite float32 values of any magnitude an honest delta might have (and some it should not).
VALUES = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
# Within the float16 range, so that every encoding can send the delta.
SENDABLE = st.floats(-6e4, 6e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def deltas(draw: st.DrawFn, values: st.SearchStrategy[float] = VALUES) -> dict[str, torch.Tensor]:
    """A delta: 1-4 named float32 tensors of small shapes (empty tensors included)."""
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    delta = {}
    for name in names:
        shape = draw(SHAPES)
        array = draw(hnp.arrays(np.float32, shape, elements=values))
        delta[name] = torch.from_numpy(array.copy())
    return delta


def _flip(data: bytes, position: int, value: int) -> bytes:
    return data[:position] + bytes([data[position] ^ (value or 1)]) + data[position + 1 :]


MUTATIONS: dict[str, Callable[[bytes, int, int], bytes]] = {
    "flip": _flip,
    "delete": lambda data, i, b: data[:i] + data[i + 1 :],
    "insert": lambda data, i, b: data[:i] + bytes([b]) + data[i:],
    "truncate": lambda data, i, b: data[:i],
    "drop-prefix": lambda data, i, b: data[i:],
    "duplicate-tail": lambda data, i, b: data + data[i:],
}
STEPS = st.lists(
    st.tuples(st.sampled_from(sorted(MUTATIONS)), st.integers(0, 2**20), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    for kind, position, value in steps:
        if data:
            data = MUTATIONS[kind](data, position % len(data), value)
    return data


def check_decoded(result: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """What the coordinator may rely on after ``decode_delta`` returned."""
    assert list(result) == list(expected)
    for key, tensor in result.items():
        assert tuple(tensor.shape) == expected[key]
        assert tensor.dtype == torch.float32
        assert bool(torch.isfinite(tensor).all())


# ---------------------------------------------------------------------------- (a) decode_delta


@FAST
@given(payload=st.binary(max_size=2048), expect_shapes=st.booleans())
def test_decode_arbitrary_bytes_rejects_or_is_well_formed(
    payload: bytes, expect_shapes: bool
) -> None:
    expected = {"layer.lora_A.weight": (2, 3)} if expect_shapes else None
    try:
        result = decode_delta(payload, MAX_PAYLOAD, expected)
    except UpdateRejected:
        return
    check_decoded(result, expected or {k: tuple(t.shape) for k, t in result.items()})


@FAST
@given(delta=deltas(SENDABLE), encoding=st.sampled_from(ENCODINGS), steps=STEPS)
def test_decode_mutated_payload_rejects_or_is_well_formed(
    delta: dict[str, torch.Tensor], encoding: str, steps: list[tuple[str, int, int]]
) -> None:
    expected = {key: tuple(tensor.shape) for key, tensor in delta.items()}
    payload = encode_delta(delta, encoding)  # type: ignore[arg-type]
    mutated = mutate(payload, steps)
    try:
        result = decode_delta(mutated, max_encoded_size(expected, encoding), expected)  # type: ignore[arg-type]
    except UpdateRejected:
        return
    check_decoded(result, expected)


# Header fields drawn from valid and invalid values alike, so that the checks before
# safetensors and safetensors' own parser both see hostile input.
DTYPES = st.sampled_from(["F32", "F16", "I8", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X"])
OFFSETS = st.one_of(st.integers(0, 64), st.integers(-(2**64), 2**65))
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)


@st.composite
def hostile_headers(draw: st.DrawFn) -> bytes:
    """A safetensors payload whose JSON header is drawn field by field."""
    header: dict[str, Any] = {}
    for name in draw(st.lists(NAMES, max_size=3, unique=True)):
        start = draw(OFFSETS)
        header[name] = {
            "dtype": draw(DTYPES),
            "shape": draw(st.lists(st.one_of(st.integers(-2, 5), JSON_SCALARS), max_size=3)),
            "data_offsets": draw(
                st.one_of(st.tuples(st.just(start), OFFSETS).map(list), JSON_SCALARS)
            ),
        }
    encoding = draw(st.sampled_from([*ENCODINGS, "fp64", 7]))
    metadata: dict[str, Any] = {
        "format": draw(st.sampled_from(["fedlora-delta/1", "other", 1])),
        "encoding": encoding,
    }
    if draw(st.booleans()):
        scales = {name: draw(JSON_SCALARS) for name in header}
        metadata["scales"] = draw(st.sampled_from([json.dumps(scales), "{", "[]", "1e999"]))
    if draw(st.booleans()):
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    padding = b" " * draw(st.integers(0, 8))  # safetensors pads its header to 8 bytes
    body = draw(st.binary(max_size=256))
    declared = draw(st.one_of(st.just(len(raw) + len(padding)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", declared) + raw + padding + body


@FAST
@given(payload=hostile_headers(), expect_shapes=st.booleans())
def test_decode_hostile_header_rejects_or_is_well_formed(
    payload: bytes, expect_shapes: bool
) -> None:
    try:
        result = decode_delta(payload, MAX_PAYLOAD, None)
    except UpdateRejected:
        return
    shapes = {key: tuple(tensor.shape) for key, tensor in result.items()}
    check_decoded(result, shapes)
    if expect_shapes:  # the same payload against a manifest it may not match
        try:
            check_decoded(decode_delta(payload, MAX_PAYLOAD, shapes), shapes)
        except UpdateRejected:
            pytest.fail("a payload that decodes must decode against its own shapes")


# ---------------------------------------------------------------------------- (b) open_delta

COORDINATOR = CoordinatorPrivateKey(X25519PrivateKey.generate())
SITE_A = Ed25519PrivateKey.generate()
SITE_B = Ed25519PrivateKey.generate()
ALLOW = AllowList({"site-a": SITE_A.public_key(), "site-b": SITE_B.public_key()})
CONTEXT = EnvelopeContext(
    run_id="run-1", round=2, site_id="site-a", module="shared", version=1, base_fingerprint="f" * 64
)
OTHER = dataclasses.replace(CONTEXT, site_id="site-b", round=3)


def seal(payload: bytes, context: EnvelopeContext = CONTEXT, key: Any = SITE_A) -> bytes:
    return seal_delta(payload, COORDINATOR.public_key(), key, context)


def open_expected(envelope: bytes, context: EnvelopeContext = CONTEXT) -> bytes:
    bound = max_envelope_bytes(MAX_PAYLOAD)
    return open_delta(envelope, COORDINATOR, ALLOW, context, bound)


@FAST
@given(payload=st.binary(max_size=512), steps=STEPS, resign=st.booleans())
def test_mutated_envelope_never_opens(
    payload: bytes, steps: list[tuple[str, int, int]], resign: bool
) -> None:
    """Also when the site itself re-signs the mutated body: HPKE binds every byte it covers."""
    original = seal(payload)
    mutated = mutate(original, steps)
    if resign and len(mutated) > SIGNATURE_BYTES:
        body = mutated[:-SIGNATURE_BYTES]
        assume(body != original[:-SIGNATURE_BYTES])
        mutated = body + SITE_A.sign(SIGNATURE_DOMAIN + body)
    assume(mutated != original)
    with pytest.raises(UpdateRejected):
        open_expected(mutated)


SPLICE_SOURCES = (seal(b"delta of site a, round 2" * 4), seal(b"site b, round 3", OTHER, SITE_B))


@FAST
@given(cut_a=st.integers(0, 2**16), cut_b=st.integers(0, 2**16), order=st.booleans())
def test_spliced_envelopes_never_open(cut_a: int, cut_b: int, order: bool) -> None:
    """A prefix of one site's envelope and the suffix of another's, under either context."""
    first, second = SPLICE_SOURCES if order else SPLICE_SOURCES[::-1]
    spliced = first[: cut_a % (len(first) + 1)] + second[cut_b % (len(second) + 1) :]
    assume(spliced not in SPLICE_SOURCES)
    for context in (CONTEXT, OTHER):
        with pytest.raises(UpdateRejected):
            open_expected(spliced, context)


@FAST
@given(envelope=st.binary(max_size=600), header_first=st.booleans())
def test_arbitrary_bytes_never_open(envelope: bytes, header_first: bool) -> None:
    if header_first:  # a plausible header, so parsing gets past the magic
        envelope = HEADER.pack(b"FLE1", 1, 1, len(CONTEXT.info()), 48) + CONTEXT.info() + envelope
    with pytest.raises(UpdateRejected):
        open_expected(envelope)


# ---------------------------------------------------------------------------- (c) config parser

SECTION_KEYS: dict[str, list[str]] = {
    name: [field.alias or key for key, field in model.model_fields.items()]
    for name, model in (
        (name, RunConfig.model_fields[name].annotation)
        for name in RunConfig.model_fields
        if name != "modules"
    )
    if isinstance(model, type)
}
ALL_KEYS = sorted({key for keys in SECTION_KEYS.values() for key in keys})
# Text is kept under 200 characters: over-long paths have their own regression test.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
CONFIG_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    TEXT,
    st.sampled_from(["auto", "cpu", "fedavg", "iid", "fp16", "tiny-llama", "none", "sealed"]),
)
CONFIG_VALUES = st.recursive(
    CONFIG_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(ALL_KEYS), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def config_dicts(draw: st.DrawFn, data_file: str) -> dict[str, Any]:
    """A config mapping: the known sections with known and unknown keys and any values."""
    raw: dict[str, Any] = {"model": {"name": "tiny-llama"}, "data": {"path": data_file}}
    for section in draw(st.lists(st.sampled_from([*SECTION_KEYS, "modules", "extra"]))):
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        keys = SECTION_KEYS.get(section, ["shared", "x"])
        for key in draw(st.lists(st.one_of(st.sampled_from(keys), TEXT), max_size=3)):
            table[key] = draw(CONFIG_VALUES)
    if draw(st.booleans()):  # a whole section replaced by a scalar or list
        raw[draw(st.sampled_from(sorted(raw)))] = draw(CONFIG_VALUES)
    return raw


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "rows.jsonl"
    path.write_text('{"instruction": "Say hi.", "response": "Hi."}\n', encoding="utf-8")
    return path


@FEW
@given(data=st.data())
def test_config_from_dict_only_raises_config_error(data_file: Path, data: st.DataObject) -> None:
    raw = data.draw(config_dicts(str(data_file)))
    try:
        cfg = config_from_dict(raw)
    except ConfigError as err:
        assert str(err).strip()
        return
    assert isinstance(cfg, RunConfig)


def toml_value(value: Any) -> str:
    """A TOML rendering of a scalar, list or inline table (enough for generated configs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(type(value))


def toml_text(raw: dict[str, Any]) -> str:
    lines = []
    for section, table in raw.items():
        if isinstance(table, dict):
            lines.append(f"[{json.dumps(section)}]")
            lines += [f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in table.items()]
        else:
            lines.insert(0, f"{json.dumps(section)} = {toml_value(table)}")
    return "\n".join(lines) + "\n"


OVERRIDES = st.lists(
    st.one_of(
        st.builds(
            lambda key, value: f"{key}={value}",
            st.sampled_from([f"{s}.{k}" for s, keys in SECTION_KEYS.items() for k in keys]),
            st.one_of(
                TEXT, st.sampled_from(["1", "-1", "0.5", "inf", "nan", "true", "[1,", "'x'"])
            ),
        ),
        TEXT,
    ),
    max_size=3,
)


@FEW
@given(data=st.data(), overrides=OVERRIDES, garble=st.lists(st.tuples(st.integers(0, 999), TEXT)))
def test_load_config_only_raises_config_error(
    data_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
    overrides: list[str],
    garble: list[tuple[int, str]],
) -> None:
    text = toml_text(data.draw(config_dicts(str(data_file))))
    for position, insert in garble:  # random edits: most make the TOML invalid
        cut = position % (len(text) + 1)
        text = text[:cut] + insert + text[cut:]
    path = tmp_path_factory.mktemp("toml") / "run.toml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        assert str(err).strip()
        return
    assert isinstance(cfg, RunConfig)


# ---------------------------------------------------------------------------- (d) aggregation

# Example or token counts, or fractions of them; not below 1e-3, where a float32 weighted sum
# (what secure aggregation reveals) underflows.
WEIGHTS = st.one_of(st.integers(0, 10**6).map(float), st.floats(1e-3, 1e6), st.just(0.0))


@st.composite
def rounds(draw: st.DrawFn) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """1-5 sites' deltas of one shared manifest, and one weight per site (total > 0)."""
    reference = draw(deltas())
    sites = draw(st.integers(1, 5))
    site_deltas = [reference]
    for _ in range(sites - 1):
        site_deltas.append(
            {
                key: torch.from_numpy(
                    draw(hnp.arrays(np.float32, tuple(t.shape), elements=VALUES)).copy()
                )
                for key, t in reference.items()
            }
        )
    weights = draw(st.lists(WEIGHTS, min_size=sites, max_size=sites))
    assume(math.fsum(weights) > 0)
    return site_deltas, weights


def scale_of(site_deltas: list[dict[str, torch.Tensor]]) -> float:
    peak = max(
        (float(t.abs().max()) for d in site_deltas for t in d.values() if t.numel()), default=0
    )
    return max(peak, 1.0)


@FAST
@given(round_=rounds(), data=st.data())
def test_fedavg_is_finite_and_permutation_invariant(
    round_: tuple[list[dict[str, torch.Tensor]], list[float]], data: st.DataObject
) -> None:
    site_deltas, weights = round_
    result = aggregate_fedavg(site_deltas, weights)
    check_decoded(result, {k: tuple(t.shape) for k, t in site_deltas[0].items()})
    order = data.draw(st.permutations(range(len(site_deltas))))
    shuffled = aggregate_fedavg([site_deltas[i] for i in order], [weights[i] for i in order])
    # float64 accumulation: orders differ by rounding far below one float32 ulp of the scale.
    atol = 1e-6 * scale_of(site_deltas)
    for key in result:
        torch.testing.assert_close(shuffled[key], result[key], rtol=1e-6, atol=atol)


@FAST
@given(delta=deltas(), weight=st.floats(1e-300, 1e300))
def test_fedavg_of_one_site_is_its_delta(delta: dict[str, torch.Tensor], weight: float) -> None:
    result = aggregate_fedavg([delta], [weight])
    for key, tensor in delta.items():
        assert torch.equal(result[key], tensor)


@FAST
@given(round_=rounds())
def test_sum_only_aggregate_matches_fedavg(
    round_: tuple[list[dict[str, torch.Tensor]], list[float]],
) -> None:
    """What secure aggregation reveals (the weighted sum and total weight) gives FedAvg."""
    site_deltas, weights = round_
    weighted_sum = {
        key: sum(
            (d[key].double() * w for d, w in zip(site_deltas, weights, strict=True)),
            torch.zeros(t.shape, dtype=torch.float64),
        ).float()
        for key, t in site_deltas[0].items()
    }
    total = math.fsum(weights)
    result = sum_only_aggregate(RULES["fedavg"], weighted_sum, total)
    expected = aggregate_fedavg(site_deltas, weights)
    check_decoded(result, {k: tuple(t.shape) for k, t in expected.items()})
    # The float32 weighted sum rounds at 2**-24 of its own magnitude, i.e. of total * scale.
    atol = 1e-6 * scale_of(site_deltas)
    for key in expected:
        torch.testing.assert_close(result[key], expected[key], rtol=1e-5, atol=atol)


@FAST
@given(delta=deltas(), sites=st.integers(1, 4))
def test_zero_total_weight_is_an_aggregation_error(
    delta: dict[str, torch.Tensor], sites: int
) -> None:
    with pytest.raises(AggregationError):
        aggregate_fedavg([delta] * sites, [0.0] * sites)


# ---------------------------------------------------------------------------- (e) data loaders

COLUMNS = ["instruction", "context", "response", "text", "label", "category", "x"]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(COLUMNS), inner, max_size=3)
    ),
    max_leaves=8,
)
ROWS = st.dictionaries(st.one_of(st.sampled_from(COLUMNS), TEXT), JSON_VALUES, max_size=5)


def _jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


FILE_BODIES = st.one_of(
    st.binary(max_size=512),
    st.lists(st.one_of(ROWS, JSON_VALUES), max_size=6).map(_jsonl),
    st.lists(ROWS, max_size=6).map(lambda rows: json.dumps(rows).encode()),
    st.builds(
        _csv,
        st.lists(st.one_of(st.sampled_from(COLUMNS), TEXT), min_size=1, max_size=4),
        st.lists(st.lists(TEXT, max_size=5), max_size=5),
    ),
    TEXT.map(lambda text: text.encode("utf-8")),
)


@FAST
@given(
    body=FILE_BODIES,
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".dat"]),
    data_format=st.sampled_from(["auto", "instruction", "classification", "text"]),
    by=st.sampled_from([None, "category"]),
    label_names=st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "0", "1"]), max_size=3)),
)
def test_load_dataset_only_raises_data_or_config_error(
    tmp_path_factory: pytest.TempPathFactory,
    body: bytes,
    suffix: str,
    data_format: str,
    by: str | None,
    label_names: list[str] | None,
) -> None:
    path = tmp_path_factory.mktemp("data") / f"rows{suffix}"
    path.write_bytes(body)
    cfg = DataConfig(path=path, format=data_format, by=by)  # type: ignore[arg-type]
    try:
        dataset = load_dataset(cfg, label_names=label_names)
    except (DataError, ConfigError) as err:
        assert str(path) in str(err)  # every data error names the file
        return
    assert dataset.examples
    for example in dataset.examples:
        assert isinstance(example.text, str) and example.text
        if dataset.kind == "classification":
            assert dataset.label_names is not None
            assert example.label is not None and 0 <= example.label < len(dataset.label_names)


# ---------------------------------------------------------------------------- the fuzz script


def test_envelope_fuzz_script_smoke() -> None:
    """``benchmarks/fuzz_envelopes.py`` on 200 cases: nothing accepted, nothing crashed."""
    spec = importlib.util.spec_from_file_location(
        "fuzz_envelopes", REPO / "benchmarks" / "fuzz_envelopes.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    report = module.run_fuzz(count=200, seed=1)
    assert report["total"]["cases"] == 200
    assert report["total"]["accepted"] == 0
    assert report["total"]["crashed"] == 0, report["crashes"]


# ---------------------------------------------------------------------------- known crashes


@pytest.mark.parametrize(
    ("suffix", "body"),
    [
        (".json", "[" * 100_000),
        (".jsonl", '{"instruction": ' + "[" * 100_000),
        (".jsonl", '{"instruction": "a", "response": ' + "1" * 5000 + "}"),
    ],
    ids=["deep-array", "deep-line", "huge-integer"],
)
def test_deep_or_huge_json_is_a_data_error(tmp_path: Path, suffix: str, body: str) -> None:
    path = tmp_path / f"rows{suffix}"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1"):
        load_dataset(DataConfig(path=path))


def test_weights_whose_sum_overflows_are_an_aggregation_error() -> None:
    delta = {"a": torch.ones(2)}
    with pytest.raises(AggregationError):
        aggregate_fedavg([delta, delta], [1e308, 1e308])


def test_sum_only_aggregate_never_returns_inf() -> None:
    weighted_sum = {"layer.lora_A.weight": torch.full((2, 2), 1e36)}
    try:
        result = sum_only_aggregate(RULES["fedavg"], weighted_sum, 1e-3)
    except (UpdateRejected, AggregationError):
        return
    assert bool(torch.isfinite(result["layer.lora_A.weight"]).all())
