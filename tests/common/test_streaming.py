"""common.streaming: the flat running sum equals the list-based rules, and a rejected delta
leaves it untouched."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pytest
import torch

from common.adapters import AdapterState, AggregationError, aggregate_fedavg
from common.encoding import Encoding, decode_delta, decode_delta_flat, encode_delta
from common.errors import UpdateRejected
from common.rules import RULES, ffa_sent_keys
from common.streaming import FlatLayout, StreamingMean

MAX_BYTES = 2**24
# Deliberately unsorted names, sizes that are not multiples of a SIMD width, an empty tensor,
# and factors of very different magnitudes.
SHAPES: dict[str, tuple[int, ...]] = {
    "m.q.lora_B.weight": (37, 8),
    "m.q.lora_A.weight": (8, 37),
    "m.head": (5,),
    "m.empty": (0, 3),
    "m.k.lora_A.weight": (13, 7),
}


def deltas(n: int, shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> list[AdapterState]:
    gen = torch.Generator().manual_seed(n)
    out = []
    for _ in range(n):
        magnitude = 10.0 ** float(torch.randint(-4, 2, (1,), generator=gen))
        out.append({k: torch.randn(s, generator=gen) * magnitude for k, s in shapes.items()})
    return out


def weights(n: int) -> list[float]:
    gen = torch.Generator().manual_seed(1000 + n)
    values = [float(w) for w in torch.randint(0, 1000, (n,), generator=gen)]
    values[0] = max(values[0], 1.0)  # a zero weight is allowed, a zero total is not
    return values


def streamed(
    items: list[AdapterState], w: list[float], dtype: torch.dtype, **kwargs: object
) -> AdapterState:
    layout = FlatLayout({k: tuple(v.shape) for k, v in items[0].items()})
    mean = StreamingMean(layout, math.fsum(w), dtype, **kwargs)  # type: ignore[arg-type]
    for delta, weight in zip(items, w, strict=True):
        mean.add_state(delta, weight)
    return mean.mean()


def assert_identical(got: AdapterState, want: AdapterState) -> None:
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype == torch.float32
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_float64_stream_is_bit_identical_to_aggregate_fedavg(n: int) -> None:
    items, w = deltas(n), weights(n)
    assert_identical(streamed(items, w, torch.float64), aggregate_fedavg(items, w))


@pytest.mark.parametrize("rule", ["fedavg", "ffa", "fedsa"])
def test_float64_stream_is_bit_identical_for_every_sum_only_rule(rule: str) -> None:
    sent = RULES[rule].sent_keys(SHAPES)
    items = [{k: d[k] for k in sent} for d in deltas(20)]
    w = weights(20)
    want = RULES[rule].aggregate(items, w)
    got = streamed(items, w, torch.float64, check=RULES[rule].check_payload)
    assert_identical(got, want)


def test_every_sum_only_rule_is_covered() -> None:
    assert {name for name, rule in RULES.items() if rule.sum_only} == {"fedavg", "ffa", "fedsa"}


def test_float32_stream_agrees_within_float32_rounding() -> None:
    items, w = deltas(200), weights(200)
    want = aggregate_fedavg(items, w)
    got = streamed(items, w, torch.float32)
    for key in want:
        scale = float(want[key].abs().max()) if want[key].numel() else 0.0
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5 * scale)


def test_unknown_total_divides_at_the_end() -> None:
    items, w = deltas(30), weights(30)
    mean = StreamingMean(FlatLayout(SHAPES), None, torch.float64)
    for delta, weight in zip(items, w, strict=True):
        mean.add_state(delta, weight)
    want = aggregate_fedavg(items, w)
    for key, value in mean.mean().items():
        torch.testing.assert_close(value, want[key], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int8-block", "int4"])
def test_stream_of_payloads_equals_the_list_of_decoded_deltas(encoding: Encoding) -> None:
    """What the coordinator does: decode each payload flat, add, release; vs decode all."""
    items, w = deltas(12), weights(12)
    payloads = [encode_delta(d, encoding) for d in items]
    layout = FlatLayout(SHAPES)
    mean = StreamingMean(layout, math.fsum(w), torch.float64)
    scratch = torch.empty(layout.numel)
    for payload, weight in zip(payloads, w, strict=True):
        mean.add(decode_delta_flat(payload, MAX_BYTES, layout, scratch), weight)
    decoded = [decode_delta(p, MAX_BYTES, SHAPES) for p in payloads]
    assert_identical(mean.mean(), aggregate_fedavg(decoded, w))


def test_layout_is_sorted_and_round_trips() -> None:
    layout = FlatLayout(SHAPES)
    assert layout.order == tuple(sorted(SHAPES))
    assert layout.numel == sum(math.prod(s) for s in SHAPES.values())
    delta = deltas(1)[0]
    back = layout.unflatten(layout.flatten(delta))
    assert list(back) == list(SHAPES)
    assert all(torch.equal(back[k], delta[k]) for k in SHAPES)
    with pytest.raises(UpdateRejected, match="missing"):
        layout.flatten({k: v for k, v in delta.items() if k != "m.head"})


def _nan(flat: torch.Tensor) -> torch.Tensor:
    flat[3] = float("nan")
    return flat


def _inf(flat: torch.Tensor) -> torch.Tensor:
    flat[-1] = float("-inf")
    return flat


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_nan, r"non-finite values \(1 NaN, 0 Inf\)"),
        (_inf, r"non-finite values \(0 NaN, 1 Inf\)"),
        (lambda f: f[:-1], "has shape"),
        (lambda f: torch.cat([f, f]), "has shape"),
        (lambda f: f.view(1, -1), "has shape"),
        (lambda f: f.to(torch.int32), "has dtype torch.int32"),
        (lambda f: f * 1e6, "exceeds the bound"),
    ],
)
def test_a_rejected_delta_leaves_the_sum_unchanged(
    spoil: Callable[[torch.Tensor], torch.Tensor], message: str
) -> None:
    items = deltas(3)
    layout = FlatLayout(SHAPES)
    kwargs = {"max_norm": 1e5}
    mean = StreamingMean(layout, 7.0, torch.float64, **kwargs)  # type: ignore[arg-type]
    mean.add_state(items[0], 2.0)
    with pytest.raises(UpdateRejected, match=message):
        mean.add(spoil(layout.flatten(items[1]) * 0 + 1.0), 3.0)
    assert mean.count == 1
    mean.add_state(items[2], 5.0)
    clean = StreamingMean(layout, 7.0, torch.float64)
    clean.add_state(items[0], 2.0)
    clean.add_state(items[2], 5.0)
    assert torch.equal(mean.flat_mean(), clean.flat_mean())


def test_a_rule_check_failure_leaves_the_sum_unchanged() -> None:
    """ffa: a site that moved its frozen A factor is refused before its B is added."""
    layout = FlatLayout(SHAPES)
    mean = StreamingMean(layout, None, torch.float64, check=RULES["ffa"].check_payload)
    good = {
        k: v if k in ffa_sent_keys(SHAPES) else torch.zeros(v.shape)
        for k, v in deltas(1)[0].items()
    }
    mean.add_state(good, 1.0)
    before = mean.flat_mean()
    bad = dict(good, **{"m.q.lora_A.weight": torch.ones(SHAPES["m.q.lora_A.weight"])})
    with pytest.raises(UpdateRejected, match=r"frozen factor 'm\.q\.lora_A\.weight'"):
        mean.add_state(bad, 1.0)
    assert torch.equal(mean.flat_mean(), before) and mean.count == 1


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_a_bad_weight_is_refused_before_adding(weight: float) -> None:
    layout = FlatLayout(SHAPES)
    mean = StreamingMean(layout, None, torch.float64)
    with pytest.raises(AggregationError, match="weight"):
        mean.add_state(deltas(1)[0], weight)
    assert mean.count == 0


def test_round_level_errors() -> None:
    layout = FlatLayout(SHAPES)
    with pytest.raises(AggregationError, match="no deltas"):
        StreamingMean(layout, 1.0).mean()
    with pytest.raises(AggregationError, match="total weight is 0"):
        StreamingMean(layout, 0.0)
    with pytest.raises(AggregationError, match="float32 or float64"):
        StreamingMean(layout, 1.0, torch.float16)
    short = StreamingMean(layout, 10.0)
    short.add_state(deltas(1)[0], 4.0)
    with pytest.raises(AggregationError, match=r"sum to 4\.0, the declared total weight is 10\.0"):
        short.mean()
    zero = StreamingMean(layout, None)
    zero.add_state(deltas(1)[0], 0.0)
    with pytest.raises(AggregationError, match="total weight is 0"):
        zero.mean()


def test_a_float32_sum_that_overflows_is_an_aggregation_error() -> None:
    layout = FlatLayout({"w": (2,)})
    mean = StreamingMean(layout, None, torch.float32)
    for _ in range(3):
        mean.add(torch.tensor([3e38, 1.0]), 1.0)
    with pytest.raises(AggregationError, match="non-finite"):
        mean.mean()
