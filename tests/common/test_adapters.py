"""Known-answer and negative tests for common.adapters (against numpy float64)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from common.adapters import (
    AdapterState,
    AggregationError,
    aggregate_fedavg,
    apply_delta,
    check_delta,
    compute_delta,
    delta_norm,
    lora_product,
    num_parameters,
    state_num_bytes,
    state_shapes,
)
from common.errors import FedloraError, UpdateRejected

RANK = 4
IN_FEATURES = 12
OUT_FEATURES = 10


def random_state(seed: int, dtype: torch.dtype = torch.float32) -> AdapterState:
    """A tiny two-layer LoRA state plus a classifier head, as peft names them."""
    gen = torch.Generator().manual_seed(seed)
    state: AdapterState = {}
    for layer in range(2):
        prefix = f"base_model.model.layers.{layer}.q_proj"
        state[f"{prefix}.lora_A.weight"] = torch.randn(RANK, IN_FEATURES, generator=gen)
        state[f"{prefix}.lora_B.weight"] = torch.randn(OUT_FEATURES, RANK, generator=gen)
    state["base_model.model.score.modules_to_save.default.weight"] = torch.randn(
        3, IN_FEATURES, generator=gen
    )
    return {key: tensor.to(dtype) for key, tensor in state.items()}


def as_numpy(state: AdapterState) -> dict[str, np.ndarray]:
    return {key: tensor.to(torch.float64).numpy() for key, tensor in state.items()}


# --- compute_delta / apply_delta -------------------------------------------------------------


def test_compute_then_apply_roundtrips() -> None:
    received, trained = random_state(0), random_state(1)
    delta = compute_delta(trained, received)
    for key, value in as_numpy(delta).items():
        expected = trained[key].double().numpy() - received[key].double().numpy()
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)
    restored = apply_delta(received, delta)
    for key in trained:
        torch.testing.assert_close(restored[key], trained[key], rtol=0, atol=1e-6)


def test_compute_delta_is_float32_for_bfloat16_states() -> None:
    delta = compute_delta(random_state(1, torch.bfloat16), random_state(0, torch.bfloat16))
    assert all(tensor.dtype == torch.float32 for tensor in delta.values())


def test_apply_delta_scales_by_lr_and_keeps_dtype() -> None:
    state, delta = random_state(0, torch.bfloat16), random_state(1)
    moved = apply_delta(state, delta, lr=0.5)
    for key, tensor in moved.items():
        assert tensor.dtype == torch.bfloat16
        expected = state[key].double().numpy() + 0.5 * delta[key].double().numpy()
        # bfloat16 keeps 8 significant bits: relative error up to 2**-8.
        np.testing.assert_allclose(tensor.double().numpy(), expected, rtol=2**-8, atol=1e-2)


def test_apply_delta_leaves_inputs_unchanged() -> None:
    state, delta = random_state(0), random_state(1)
    before = {key: tensor.clone() for key, tensor in state.items()}
    apply_delta(state, delta)
    for key in state:
        assert torch.equal(state[key], before[key])


def test_apply_delta_validates_the_delta() -> None:
    state, delta = random_state(0), random_state(1)
    del delta["base_model.model.layers.0.q_proj.lora_A.weight"]
    with pytest.raises(UpdateRejected, match=r"missing \['base_model.model.layers.0.q_proj"):
        apply_delta(state, delta)


def test_compute_delta_rejects_mismatched_keys() -> None:
    trained = random_state(1)
    trained["extra.weight"] = torch.zeros(2)
    with pytest.raises(UpdateRejected, match=r"unexpected \['extra.weight'\]"):
        compute_delta(trained, random_state(0))


# --- aggregate_fedavg ------------------------------------------------------------------------


def test_fedavg_matches_numpy_weighted_mean() -> None:
    deltas = [random_state(seed) for seed in range(5)]
    weights = [3.0, 1.0, 7.5, 0.25, 12.0]
    result = aggregate_fedavg(deltas, weights)
    total = sum(weights)
    for key, value in result.items():
        assert value.dtype == torch.float32
        expected = sum(
            w / total * d[key].double().numpy() for w, d in zip(weights, deltas, strict=True)
        )
        np.testing.assert_allclose(value.double().numpy(), expected, rtol=1e-6, atol=1e-7)


def test_fedavg_normalises_weights() -> None:
    deltas = [random_state(0), random_state(1)]
    small = aggregate_fedavg(deltas, [1.0, 3.0])
    large = aggregate_fedavg(deltas, [10.0, 30.0])
    equal = aggregate_fedavg(deltas, [2.0, 2.0])
    for key in small:
        torch.testing.assert_close(small[key], large[key], rtol=1e-6, atol=1e-7)
        plain_mean = (deltas[0][key].double() + deltas[1][key].double()) / 2
        torch.testing.assert_close(equal[key].double(), plain_mean, rtol=1e-6, atol=1e-7)


def test_fedavg_of_one_site_is_its_delta() -> None:
    delta = random_state(3)
    result = aggregate_fedavg([delta], [42.0])
    assert list(result) == list(delta)
    for key in delta:
        assert torch.equal(result[key], delta[key])


def test_fedavg_zero_weight_site_contributes_nothing() -> None:
    deltas = [random_state(0), random_state(1)]
    result = aggregate_fedavg(deltas, [5.0, 0.0])
    for key in result:
        assert torch.equal(result[key], deltas[0][key])


@pytest.mark.parametrize(
    ("num_deltas", "weights", "message"),
    [
        (0, [], "no deltas"),
        (2, [1.0], "2 deltas but 1 weights"),
        (2, [0.0, 0.0], "total weight is 0.0"),
        (2, [1.0, -1.0], r"weights\[1\] is -1.0"),
        (2, [1.0, math.nan], r"weights\[1\] is nan"),
        (2, [math.inf, 1.0], r"weights\[0\] is inf"),
    ],
)
def test_fedavg_refuses_rounds_that_cannot_be_aggregated(
    num_deltas: int, weights: list[float], message: str
) -> None:
    deltas = [random_state(seed) for seed in range(num_deltas)]
    with pytest.raises(AggregationError, match=message):
        aggregate_fedavg(deltas, weights)
    assert issubclass(AggregationError, FedloraError)


def test_fedavg_names_the_mismatched_delta() -> None:
    deltas = [random_state(0), random_state(1), random_state(2)]
    key = "base_model.model.layers.1.q_proj.lora_B.weight"
    deltas[2][key] = torch.zeros(OUT_FEATURES, RANK + 1)
    with pytest.raises(UpdateRejected, match=r"deltas\[2\] of 3: .*lora_B.*\(10, 5\)"):
        aggregate_fedavg(deltas, [1.0, 1.0, 1.0])


# --- the FedAvg bias on LoRA products --------------------------------------------------------


def test_lora_product_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(RANK, IN_FEATURES, generator=gen),
        torch.randn(OUT_FEATURES, RANK, generator=gen),
    )
    expected = b.double().numpy() @ a.double().numpy() * 0.5
    np.testing.assert_allclose(lora_product(a, b, 0.5).double().numpy(), expected, rtol=1e-5)


def test_lora_product_refuses_factors_of_different_rank() -> None:
    with pytest.raises(UpdateRejected, match=r"B has shape \(10, 3\), A has shape \(4, 12\)"):
        lora_product(torch.zeros(4, 12), torch.zeros(10, 3), 1.0)


def _site_factors(seed: int, shared_a: torch.Tensor | None) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    a = shared_a if shared_a is not None else torch.randn(RANK, IN_FEATURES, generator=gen)
    return {"lora_A": a, "lora_B": torch.randn(OUT_FEATURES, RANK, generator=gen)}


def _product_gap(sites: list[AdapterState], scaling: float = 2.0) -> float:
    """|| product of averaged factors - average of products || / || average of products ||."""
    averaged = aggregate_fedavg(sites, [1.0] * len(sites))
    of_means = lora_product(averaged["lora_A"], averaged["lora_B"], scaling).double()
    products = [lora_product(s["lora_A"], s["lora_B"], scaling).double() for s in sites]
    mean_of_products = torch.stack(products).mean(dim=0)
    return float((of_means - mean_of_products).norm() / mean_of_products.norm())


def test_fedavg_of_factors_is_not_the_mean_of_products() -> None:
    # Independent A and B per site: mean(B) @ mean(A) misses the cross terms B_i @ A_j.
    assert _product_gap([_site_factors(1, None), _site_factors(2, None)]) > 0.1


def test_fedavg_of_factors_is_exact_when_a_is_shared() -> None:
    # FFA-LoRA: with one A for every site, mean(B_i) @ A == mean(B_i @ A).
    shared_a = torch.randn(RANK, IN_FEATURES, generator=torch.Generator().manual_seed(9))
    assert _product_gap([_site_factors(1, shared_a), _site_factors(2, shared_a)]) < 1e-6


# --- check_delta -----------------------------------------------------------------------------

KEY_A = "base_model.model.layers.0.q_proj.lora_A.weight"


def test_check_delta_accepts_a_matching_delta() -> None:
    check_delta(random_state(1), random_state(0), max_norm=1e6)


def _missing(delta: AdapterState) -> None:
    del delta[KEY_A]


def _extra(delta: AdapterState) -> None:
    delta["base_model.model.layers.9.v_proj.lora_A.weight"] = torch.zeros(RANK, IN_FEATURES)


def _wrong_shape(delta: AdapterState) -> None:
    delta[KEY_A] = torch.zeros(RANK, IN_FEATURES + 1)


def _nan(delta: AdapterState) -> None:
    delta[KEY_A][1, 2] = math.nan


def _inf(delta: AdapterState) -> None:
    delta[KEY_A][0, 0] = -math.inf


def _integer(delta: AdapterState) -> None:
    delta[KEY_A] = torch.zeros(RANK, IN_FEATURES, dtype=torch.int64)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_missing, rf"missing \['{KEY_A}'\]"),
        (_extra, r"unexpected \['base_model.model.layers.9.v_proj.lora_A.weight'\]"),
        (_wrong_shape, rf"'{KEY_A}' has shape \(4, 13\), expected \(4, 12\)"),
        (_nan, rf"'{KEY_A}' holds non-finite values \(1 NaN, 0 Inf\)"),
        (_inf, rf"'{KEY_A}' holds non-finite values \(0 NaN, 1 Inf\)"),
        (_integer, rf"'{KEY_A}' has dtype torch.int64, expected a floating-point dtype"),
    ],
    ids=["missing-key", "extra-key", "wrong-shape", "nan", "inf", "integer"],
)
def test_check_delta_rejects(corrupt: Callable[[AdapterState], None], message: str) -> None:
    delta = random_state(1)
    corrupt(delta)
    with pytest.raises(UpdateRejected, match=message):
        check_delta(delta, random_state(0))


def test_check_delta_rejects_a_norm_over_the_bound() -> None:
    delta = {"w": torch.tensor([3.0, 4.0])}
    check_delta(delta, delta, max_norm=5.0)
    with pytest.raises(UpdateRejected, match=r"delta L2 norm 5 exceeds the bound 4\.99"):
        check_delta(delta, delta, max_norm=4.99)


def test_check_delta_lists_at_most_five_keys() -> None:
    reference = {f"k{i:02d}": torch.zeros(1) for i in range(20)}
    with pytest.raises(UpdateRejected, match=r"missing \['k00', .*'k04', \.\.\. \(\+15 more\)\]"):
        check_delta({}, reference)


# --- norms and sizes -------------------------------------------------------------------------


def test_delta_norm_matches_numpy() -> None:
    delta = random_state(4)
    flat = np.concatenate([value.ravel() for value in as_numpy(delta).values()])
    assert delta_norm(delta) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-12)
    assert delta_norm({}) == 0.0


def test_sizes_count_every_tensor_in_its_own_dtype() -> None:
    state = {
        "a": torch.zeros(4, 8, dtype=torch.float32),
        "b": torch.zeros(8, 4, dtype=torch.bfloat16),
        "c": torch.zeros(3, dtype=torch.int8),
    }
    assert num_parameters(state) == 32 + 32 + 3
    assert state_num_bytes(state) == 32 * 4 + 32 * 2 + 3
    assert state_shapes(state) == {"a": (4, 8), "b": (8, 4), "c": (3,)}
