"""Error feedback (``common.error_feedback``): known answers on deltas that rounding loses."""

from __future__ import annotations

import pytest
import torch

from common.encoding import decode_delta, encode_delta
from common.error_feedback import encode_with_feedback
from common.errors import UpdateRejected

ROUNDS = 50


def _steady_delta() -> dict[str, torch.Tensor]:
    """One block of 64 values: one large pull and many small steady ones, which int4 (one
    scale per 64 values, 7 levels a side) rounds to zero every round."""
    values = torch.full((4, 16), 3e-3)
    values[0, 0] = 1.0
    return {"layer/lora_B": values}


def _sent(payload: bytes, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return decode_delta(payload, len(payload), {k: tuple(v.shape) for k, v in like.items()})


@pytest.mark.parametrize("encoding", ["int4", "int8", "int8-block"])
def test_what_was_sent_over_many_rounds_differs_from_the_true_sum_by_the_last_residual(
    encoding: str,
) -> None:
    delta = _steady_delta()
    residual: dict[str, torch.Tensor] = {}
    total_sent = torch.zeros(4, 16)
    for _ in range(ROUNDS):
        payload, residual = encode_with_feedback(delta, residual, encoding)  # type: ignore[arg-type]
        total_sent += _sent(payload, delta)["layer/lora_B"]
    true_total = ROUNDS * delta["layer/lora_B"]
    # Telescoping: sent = true - last residual, to float32 rounding over 50 additions.
    torch.testing.assert_close(total_sent + residual["layer/lora_B"], true_total, atol=1e-5, rtol=0)
    # The last residual is at most one rounding error of one round (half a step of the
    # largest scale, 1.0 / 7 for int4), not ROUNDS of them.
    assert residual["layer/lora_B"].abs().max() <= 0.5 / 7 + 1e-6


def test_without_feedback_int4_loses_every_small_pull_and_with_it_none() -> None:
    delta = _steady_delta()
    plain = _sent(encode_delta(delta, "int4"), delta)["layer/lora_B"]
    assert plain[1:].abs().max() == 0.0  # rounded away: 50 rounds would send nothing of it
    residual: dict[str, torch.Tensor] = {}
    total = torch.zeros(4, 16)
    for _ in range(ROUNDS):
        payload, residual = encode_with_feedback(delta, residual, "int4")
        total += _sent(payload, delta)["layer/lora_B"]
    small = total.flatten()[1:]
    # 50 rounds x 3e-3 = 0.15 per coordinate arrives within one int4 step of the largest
    # scale at the last send (the residual); without feedback 0.0 would arrive.
    assert (small - 0.15).abs().max() <= 1.0 / 7 + 1e-6
    assert small.sum() > 0.5 * 63 * 0.15


def test_the_first_round_is_the_plain_encoding() -> None:
    delta = _steady_delta()
    payload, residual = encode_with_feedback(delta, {}, "int4")
    sent = _sent(payload, delta)["layer/lora_B"]
    plain = _sent(encode_delta(delta, "int4"), delta)["layer/lora_B"]
    torch.testing.assert_close(sent, plain, atol=0, rtol=0)
    expected = delta["layer/lora_B"] - sent
    torch.testing.assert_close(residual["layer/lora_B"], expected, atol=0, rtol=0)


def test_a_residual_of_other_tensors_or_shapes_is_refused() -> None:
    delta = _steady_delta()
    with pytest.raises(UpdateRejected, match="does not fit"):
        encode_with_feedback(delta, {"other": torch.zeros(4, 16)}, "int4")
    with pytest.raises(UpdateRejected, match="does not fit"):
        encode_with_feedback(delta, {"layer/lora_B": torch.zeros(16, 4)}, "int4")
