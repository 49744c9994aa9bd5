"""The down-link step: its digest, the published state and its rebuild, bit for bit."""

from __future__ import annotations

import pytest
import torch

from common.adapters import compute_delta
from common.downlink import apply_step, check_rebuilt, published_step, state_sha256
from common.encoding import ENCODINGS, Encoding, decode_delta, encode_delta
from common.errors import UpdateRejected
from common.payload_format import DELTA_FORMAT, STEP_FORMAT

MAX_BYTES = 1 << 20


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "shared/q.lora_A.weight": torch.randn(4, 16, generator=gen) * scale,
        "shared/q.lora_B.weight": torch.randn(16, 4, generator=gen) * scale,
    }


def test_digest_is_of_the_tensors_not_their_order_or_container() -> None:
    state = _state(0)
    reordered = dict(reversed(list(state.items())))
    copied = {k: v.clone() for k, v in state.items()}
    assert state_sha256(state) == state_sha256(reordered) == state_sha256(copied)


def test_digest_changes_with_one_bit_a_dtype_a_shape_or_a_name() -> None:
    state = _state(0)
    digest = state_sha256(state)
    flipped = {k: v.clone() for k, v in state.items()}
    flipped["shared/q.lora_A.weight"].view(torch.int32)[0, 0] ^= 1
    key = "shared/q.lora_B.weight"
    others = [
        flipped,
        {**state, key: state[key].to(torch.float64)},
        {**state, key: state[key].reshape(4, 16)},
        {"shared/q.lora_A.weight": state["shared/q.lora_A.weight"], "x": state[key]},
    ]
    assert all(state_sha256(other) != digest for other in others)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_published_state_is_what_the_step_rebuilds_bit_for_bit(encoding: Encoding) -> None:
    base, new = _state(0), _state(1)
    payload, published = published_step(base, new, encoding, MAX_BYTES)
    rebuilt = apply_step({k: v.clone() for k, v in base.items()}, payload, MAX_BYTES)
    assert state_sha256(rebuilt) == state_sha256(published)
    assert all(torch.equal(rebuilt[k], published[k]) for k in base)


def test_an_fp32_step_rebuilds_within_one_rounding_and_fp16_within_its_precision() -> None:
    base, new = _state(0), _state(1, scale=0.01)
    step = {k: new[k].double() - base[k].double() for k in base}
    for encoding, relative in (("fp32", 2.0**-23), ("fp16", 2.0**-11)):
        _, published = published_step(base, new, encoding, MAX_BYTES)
        for key in base:
            error = (published[key].double() - new[key].double()).abs()
            # the step's own rounding, plus one float32 rounding of the sum (|new| <= ~4)
            bound = relative * step[key].abs() + 2.0**-24 * 8 + 1e-12
            assert bool((error <= bound).all()), (encoding, key)


def test_a_step_of_other_names_or_shapes_is_refused() -> None:
    base = _state(0)
    wrong = encode_delta({"shared/q.lora_A.weight": torch.zeros(4, 16)}, "fp16", STEP_FORMAT)
    with pytest.raises(UpdateRejected, match="decoded delta"):
        apply_step(base, wrong, MAX_BYTES)
    payload, _ = published_step(base, _state(1), "fp16", MAX_BYTES)
    with pytest.raises(UpdateRejected):
        apply_step(base, payload[:-7], MAX_BYTES)  # truncated
    with pytest.raises(UpdateRejected, match="over the bound"):
        apply_step(base, payload, 64)


def test_a_step_and_a_sites_update_are_not_taken_for_each_other() -> None:
    """The down-link step carries its own format tag: a site's update (or a replayed one)
    is no step, and a step sent back up is no update."""
    base = _state(0)
    update = encode_delta(compute_delta(_state(1), base), "fp16")  # as a site sends it
    with pytest.raises(UpdateRejected, match=f"expected {STEP_FORMAT!r}"):
        apply_step(base, update, MAX_BYTES)
    payload, _ = published_step(base, _state(1), "fp16", MAX_BYTES)
    assert STEP_FORMAT.encode() in payload and DELTA_FORMAT.encode() not in payload
    with pytest.raises(UpdateRejected, match=f"expected {DELTA_FORMAT!r}"):
        decode_delta(payload, MAX_BYTES)


def test_a_rebuilt_state_of_another_digest_is_refused_naming_both() -> None:
    state = _state(0)
    check_rebuilt(state, state_sha256(state), 3)
    other = state_sha256(_state(1))
    with pytest.raises(UpdateRejected, match=f"v0003 .* {other[:16]}"):
        check_rebuilt(state, other, 3)
