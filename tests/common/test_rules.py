"""Known-answer and negative tests for common.rules (references in numpy float64)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from common.adapters import (
    AdapterState,
    AggregationError,
    aggregate_fedavg,
    apply_delta,
    lora_product,
    state_num_bytes,
)
from common.errors import ConfigError, UpdateRejected
from common.exact import aggregate_exact, factors_for_site_rank
from common.lora_keys import lora_factor, lora_pairs
from common.rules import (
    RULES,
    aggregate_fedsa,
    aggregate_ffa,
    fedsa_sent_keys,
    ffa_sent_keys,
    get_rule,
    sum_only_aggregate,
)

ALPHA = 16.0
HEAD = "base_model.model.score.modules_to_save.default.weight"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run torch on one thread while a test here runs.

    The matrices are small (at most 576 x 576, or 100k x 8): on a loaded 2-core CI machine
    thread contention turned a 0.07 s SVD into seconds.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def a_key(layer: int) -> str:
    return f"base_model.model.layers.{layer}.self_attn.q_proj.lora_A.weight"


def b_key(layer: int) -> str:
    return f"base_model.model.layers.{layer}.self_attn.q_proj.lora_B.weight"


def site_state(
    seed: int, rank: int, d: int = 64, k: int = 48, layers: int = 2, shared_a: int | None = None
) -> AdapterState:
    """Random factors for ``layers`` layers plus a head; A drawn from seed ``shared_a`` if set."""
    gen = torch.Generator().manual_seed(seed)
    a_gen = torch.Generator().manual_seed(shared_a) if shared_a is not None else gen
    state: AdapterState = {}
    for layer in range(layers):
        state[a_key(layer)] = torch.randn(rank, k, generator=a_gen) / math.sqrt(k)
        state[b_key(layer)] = torch.randn(d, rank, generator=gen)
    state[HEAD] = torch.randn(3, k, generator=gen)
    return state


def mean_of_products(
    states: list[AdapterState], weights: list[float], layer: int = 0
) -> np.ndarray:
    """Dense ``sum_i w_i B_i A_i s_i / sum_i w_i`` in float64, the reference ``exact`` avoids."""
    total = sum(weights)
    dense = 0.0
    for state, weight in zip(states, weights, strict=True):
        a, b = state[a_key(layer)].double().numpy(), state[b_key(layer)].double().numpy()
        dense = dense + weight / total * (b @ a) * (ALPHA / a.shape[0])
    assert isinstance(dense, np.ndarray)
    return dense


def best_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    """Truncated SVD of the dense float64 matrix (Eckart-Young), torch's LAPACK."""
    u, sigma, vt = (
        x.numpy() for x in torch.linalg.svd(torch.from_numpy(matrix), full_matrices=False)
    )
    return (u[:, :rank] * sigma[:rank]) @ vt[:rank]


def product(state: AdapterState, rank: int, layer: int = 0) -> np.ndarray:
    a, b = state[a_key(layer)].double().numpy(), state[b_key(layer)].double().numpy()
    return b @ a * (ALPHA / rank)


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def run_exact(states: list[AdapterState], weights: list[float], rank: int) -> AdapterState:
    scalings = [ALPHA / s[a_key(0)].shape[0] for s in states]
    return aggregate_exact(states, weights, scalings, rank, ALPHA / rank)


# --- exact: known answers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranks", "d", "k"),
    [
        ([8, 8, 8], 64, 48),
        ([4, 8, 16], 64, 48),
        ([8, 8, 8], 576, 576),
        ([4, 8, 16], 576, 576),
    ],
)
def test_exact_is_the_truncated_svd_of_the_mean_of_products(
    ranks: list[int], d: int, k: int
) -> None:
    layers = 2 if d < 100 else 1  # one dense 576 x 576 reference SVD is enough
    states = [site_state(seed, r, d, k, layers) for seed, r in enumerate(ranks)]
    weights = [3.0, 1.0, 6.0]
    result = run_exact(states, weights, rank=8)
    for layer in range(layers):
        assert result[a_key(layer)].shape == (8, k)
        assert result[b_key(layer)].shape == (d, 8)
        assert result[a_key(layer)].dtype == torch.float32
        reference = best_rank(mean_of_products(states, weights, layer), 8)
        # Factors are unique only up to an invertible r x r map: compare products.
        assert relative_error(product(result, 8, layer), reference) < 1e-5


@pytest.mark.parametrize(("ranks", "shared_a"), [([2, 3, 3], None), ([4, 4, 4], 7)])
def test_exact_reproduces_a_mean_of_rank_at_most_r(ranks: list[int], shared_a: int | None) -> None:
    # Total rank 8 = r, or three sites sharing one rank-4 A: the mean has rank <= 8.
    states = [site_state(seed, r, shared_a=shared_a) for seed, r in enumerate(ranks)]
    weights = [1.0, 2.0, 5.0]
    result = run_exact(states, weights, rank=8)
    dense = mean_of_products(states, weights)
    assert relative_error(product(result, 8), dense) < 1e-6


def test_exact_pads_with_zeros_when_the_sites_have_fewer_directions() -> None:
    state = site_state(0, rank=4)
    result = run_exact([state], [1.0], rank=8)
    assert relative_error(product(result, 8), product(state, 4)) < 1e-6
    assert torch.equal(result[b_key(0)][:, 4:], torch.zeros(64, 4))
    assert torch.equal(result[a_key(0)][4:], torch.zeros(4, 48))


def test_exact_fill_revives_directions_without_signal() -> None:
    state = site_state(0, rank=4)
    result = aggregate_exact([state], [1.0], [ALPHA / 4], 8, ALPHA / 8, fill_seed=3)
    assert relative_error(product(result, 8), product(state, 4)) < 1e-6
    assert torch.equal(result[b_key(0)][:, 4:], torch.zeros(64, 4))
    fresh = result[a_key(0)][4:]
    # peft's A init: uniform in +-1/sqrt(k), so B columns 4..7 get gradients at the sites.
    assert bool((fresh != 0).all()) and float(fresh.abs().max()) <= 1 / math.sqrt(48)
    again = aggregate_exact([state], [1.0], [ALPHA / 4], 8, ALPHA / 8, fill_seed=3)
    assert all(torch.equal(result[key], again[key]) for key in result)


def test_exact_fill_keeps_an_untrained_adapter_trainable() -> None:
    # Every site sent B = 0 (no signal): without fill the adapter would become all zeros.
    states = [site_state(seed, 8) for seed in range(2)]
    for state in states:
        for layer in range(2):
            state[b_key(layer)] = torch.zeros(64, 8)
    dead = run_exact(states, [1.0, 1.0], 8)
    assert not bool(dead[a_key(0)].any()) and not bool(dead[b_key(0)].any())
    revived = aggregate_exact(states, [1.0, 1.0], [2.0, 2.0], 8, 2.0, fill_seed=0)
    assert not bool(revived[b_key(0)].any())
    assert bool((revived[a_key(0)].abs().sum(dim=1) > 0).all())


def test_exact_fill_changes_nothing_when_every_direction_has_signal() -> None:
    states = [site_state(seed, 8) for seed in range(3)]
    plain = run_exact(states, [1.0] * 3, 8)
    filled = aggregate_exact(states, [1.0] * 3, [2.0] * 3, 8, 2.0, fill_seed=1)
    assert all(torch.equal(plain[key], filled[key]) for key in plain)


def test_exact_never_forms_the_dense_matrix() -> None:
    # 100k x 100k in float64 would be 80 GB; the stacked factors are 100k x 8 (6.4 MB).
    d = k = 100_000
    states = [site_state(seed, 4, d, k, layers=1) for seed in range(2)]
    result = run_exact(states, [1.0, 3.0], rank=8)
    rows, cols = slice(1000, 1040), slice(5000, 5030)

    def block(state: AdapterState, rank: int) -> np.ndarray:
        a, b = state[a_key(0)][:, cols].double(), state[b_key(0)][rows].double()
        return (b @ a * (ALPHA / rank)).numpy()

    expected = 0.25 * block(states[0], 4) + 0.75 * block(states[1], 4)
    assert relative_error(block(result, 8), expected) < 1e-6


def test_exact_averages_other_tensors_and_keeps_key_order() -> None:
    states = [site_state(seed, r) for seed, r in enumerate([4, 8])]
    result = run_exact(states, [1.0, 3.0], rank=8)
    assert list(result) == list(states[0])
    expected = 0.25 * states[0][HEAD].double() + 0.75 * states[1][HEAD].double()
    torch.testing.assert_close(result[HEAD].double(), expected, rtol=1e-6, atol=1e-7)


def test_exact_is_deterministic_with_canonical_signs() -> None:
    states = [site_state(seed, 8) for seed in range(3)]
    first, second = run_exact(states, [1.0] * 3, 8), run_exact(states, [1.0] * 3, 8)
    assert all(torch.equal(first[key], second[key]) for key in first)
    b = first[b_key(0)]
    peaks = b.gather(0, b.abs().argmax(dim=0, keepdim=True))
    assert bool((peaks > 0).all())


def test_exact_ignores_zero_weight_sites() -> None:
    states = [site_state(seed, 8) for seed in range(3)]
    with_zero = run_exact(states, [1.0, 0.0, 2.0], 8)
    without = run_exact([states[0], states[2]], [1.0, 2.0], 8)
    for key in with_zero:
        torch.testing.assert_close(with_zero[key], without[key], rtol=1e-6, atol=1e-6)


# --- exact: validation -----------------------------------------------------------------------


def test_exact_rejects_a_site_with_another_output_size() -> None:
    states = [site_state(0, 8), site_state(1, 8, d=65)]
    with pytest.raises(UpdateRejected, match=r"site_states\[1\].*lora_A.*\(65, 48\) product"):
        run_exact(states, [1.0, 1.0], 8)


def test_exact_rejects_factors_that_do_not_compose() -> None:
    states = [site_state(0, 8), site_state(1, 8)]
    states[1][b_key(1)] = torch.zeros(64, 5)
    with pytest.raises(UpdateRejected, match=r"site_states\[1\].*layers.1.*do not compose"):
        run_exact(states, [1.0, 1.0], 8)


def test_exact_rejects_missing_keys_and_orphan_factors() -> None:
    states = [site_state(0, 8), site_state(1, 8)]
    del states[1][HEAD]
    with pytest.raises(UpdateRejected, match=r"site_states\[1\] keys differ.*missing.*score"):
        run_exact(states, [1.0, 1.0], 8)
    del states[0][b_key(0)]
    with pytest.raises(UpdateRejected, match=r"has no matching.*lora_B"):
        run_exact(states, [1.0, 1.0], 8)


def test_exact_rejects_non_finite_factors() -> None:
    states = [site_state(0, 8), site_state(1, 8)]
    states[0][a_key(1)][0, 0] = math.nan
    with pytest.raises(UpdateRejected, match=r"site_states\[0\].*layers.1.*1 NaN"):
        run_exact(states, [1.0, 1.0], 8)


@pytest.mark.parametrize(
    ("scalings", "rank", "global_scaling", "message"),
    [
        ([2.0], 8, 2.0, "2 site states but 1 site scalings"),
        ([2.0, 0.0], 8, 2.0, r"site_scalings\[1\] is 0.0"),
        ([2.0, math.nan], 8, 2.0, r"site_scalings\[1\] is nan"),
        ([2.0, 2.0], 0, 2.0, "global_rank is 0"),
        ([2.0, 2.0], 8, -1.0, "global_scaling is -1.0"),
    ],
)
def test_exact_refuses_impossible_arguments(
    scalings: list[float], rank: int, global_scaling: float, message: str
) -> None:
    states = [site_state(0, 8), site_state(1, 8)]
    with pytest.raises(AggregationError, match=message):
        aggregate_exact(states, [1.0, 1.0], scalings, rank, global_scaling)


def test_exact_refuses_an_empty_round() -> None:
    with pytest.raises(AggregationError, match="no deltas"):
        aggregate_exact([], [], [], 8, 2.0)


# --- per-site ranks --------------------------------------------------------------------------


def test_factors_for_a_smaller_site_rank_are_the_best_approximation() -> None:
    states = [site_state(seed, 8) for seed in range(3)]
    global_state = run_exact(states, [1.0] * 3, 8)
    site = factors_for_site_rank(global_state, 4, ALPHA / 8, ALPHA / 4)
    assert site[a_key(0)].shape == (4, 48) and site[b_key(0)].shape == (64, 4)
    reference = best_rank(product(global_state, 8), 4)
    assert relative_error(product(site, 4), reference) < 1e-5
    assert torch.equal(site[HEAD], global_state[HEAD])


@pytest.mark.parametrize("fill_seed", [None, 5])
def test_factors_for_a_larger_site_rank_keep_the_product(fill_seed: int | None) -> None:
    global_state = run_exact([site_state(0, 8)], [1.0], 8)
    site = factors_for_site_rank(global_state, 16, ALPHA / 8, ALPHA / 16, fill_seed=fill_seed)
    assert relative_error(product(site, 16), product(global_state, 8)) < 1e-6
    assert torch.equal(site[b_key(0)][:, 8:], torch.zeros(64, 8))
    padded = site[a_key(0)][8:]
    if fill_seed is None:
        assert torch.equal(padded, torch.zeros(8, 48))
    else:
        # peft's default A init: uniform in +-1/sqrt(k); the same seed gives the same rows.
        assert 0 < float(padded.abs().max()) <= 1 / math.sqrt(48)
        again = factors_for_site_rank(global_state, 16, ALPHA / 8, ALPHA / 16, fill_seed=5)
        assert torch.equal(again[a_key(0)], site[a_key(0)])


def test_factors_for_site_rank_refuses_impossible_arguments() -> None:
    with pytest.raises(AggregationError, match="site_rank 0"):
        factors_for_site_rank(site_state(0, 8), 0, 2.0, 2.0)


@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsa"])
def test_rules_other_than_exact_require_equal_ranks(name: str) -> None:
    rule = get_rule(name)
    deltas = [sent(site_state(seed, r), name) for seed, r in ((0, 8), (1, 4))]
    with pytest.raises(UpdateRejected, match=r"deltas\[1\] of 2: .*layers\.0.*has shape"):
        rule.aggregate(deltas, [1.0, 1.0])


# --- ffa and fedsa ---------------------------------------------------------------------------


def sent(state: AdapterState, rule_name: str) -> AdapterState:
    """The part of ``state`` a site sends under ``rule_name``."""
    return {key: state[key] for key in RULES[rule_name].sent_keys(state)}


def ffa_round(num_sites: int) -> tuple[AdapterState, list[AdapterState], list[float]]:
    """A global state and the sites' B-and-head deltas; A is shared and frozen."""
    global_state = site_state(100, 8, shared_a=7)
    deltas = [sent(site_state(seed, 8), "ffa") for seed in range(num_sites)]
    weights = [float(seed + 1) for seed in range(num_sites)]
    return global_state, deltas, weights


def test_ffa_is_exactly_the_mean_of_products() -> None:
    global_state, deltas, weights = ffa_round(3)
    mean = aggregate_ffa(deltas, weights)
    sent_global = sent(global_state, "ffa")
    new_global = {**global_state, **apply_delta(sent_global, mean)}
    trained = [{**global_state, **apply_delta(sent_global, delta)} for delta in deltas]
    for layer in range(2):
        expected = mean_of_products(trained, weights, layer)
        assert relative_error(product(new_global, 8, layer), expected) < 1e-6


def test_ffa_sends_half_the_lora_bytes() -> None:
    state = site_state(0, 8, d=48, k=48)
    keys = ffa_sent_keys(state)
    assert keys == [b_key(0), b_key(1), HEAD]
    lora = {key: t for key, t in state.items() if lora_factor(key) is not None}
    sent_lora = {key: lora[key] for key in keys if key in lora}
    assert 2 * state_num_bytes(sent_lora) == state_num_bytes(lora)


def test_ffa_accepts_zero_a_deltas_and_rejects_trained_a() -> None:
    deltas = [site_state(seed, 8) for seed in range(2)]
    for delta in deltas:
        for layer in range(2):
            delta[a_key(layer)] = torch.zeros(8, 48)
    result = aggregate_ffa(deltas, [1.0, 1.0])
    assert torch.equal(result[a_key(0)], torch.zeros(8, 48))
    deltas[1][a_key(1)][3, 4] = 1e-3
    with pytest.raises(
        UpdateRejected, match=r"deltas\[1\] of 2: ffa: .*layers.1.*lora_A.*non-zero"
    ):
        aggregate_ffa(deltas, [1.0, 1.0])


def test_fedsa_sends_a_and_keeps_b_private() -> None:
    state = site_state(0, 8)
    assert fedsa_sent_keys(state) == [a_key(0), a_key(1), HEAD]
    deltas = [sent(site_state(seed, 8), "fedsa") for seed in range(2)]
    result = aggregate_fedsa(deltas, [1.0, 3.0])
    expected = aggregate_fedavg(deltas, [1.0, 3.0])
    assert all(torch.equal(result[key], expected[key]) for key in expected)
    deltas[0][b_key(1)] = state[b_key(1)]
    with pytest.raises(
        UpdateRejected, match=r"deltas\[0\] of 2: fedsa: .*lora_B.*must not be sent"
    ):
        aggregate_fedsa(deltas, [1.0, 3.0])


# --- the FedAvg bias, and exact removing it --------------------------------------------------


def test_fedavg_of_factors_is_not_the_mean_of_products_but_exact_is() -> None:
    states = [site_state(seed, 4) for seed in range(2)]
    weights = [1.0, 1.0]
    dense = mean_of_products(states, weights)
    averaged = aggregate_fedavg(states, weights)
    # Independent A_i: mean(B) @ mean(A) drops the cross terms and halves the product.
    assert relative_error(product(averaged, 4), dense) > 0.3
    assert relative_error(product(run_exact(states, weights, 8), 8), dense) < 1e-6
    assert (
        relative_error(
            lora_product(averaged[a_key(0)], averaged[b_key(0)], ALPHA / 4).double().numpy(),
            product(averaged, 4),
        )
        < 1e-6
    )


# --- sum-only rules from sums alone ----------------------------------------------------------


@pytest.mark.parametrize("name", [name for name, rule in RULES.items() if rule.sum_only])
def test_sum_only_rules_need_only_the_sums(name: str) -> None:
    rule = get_rule(name)
    deltas = [sent(site_state(seed, 8), name) for seed in range(4)]
    weights = [3.0, 0.5, 7.0, 2.0]
    # What secure aggregation reveals: sum_i w_i x_i and sum_i w_i, nothing per site.
    weighted_sum = {
        key: sum(w * d[key].double() for w, d in zip(weights, deltas, strict=True)).float()
        for key in deltas[0]
    }
    from_sums = sum_only_aggregate(rule, weighted_sum, sum(weights))
    per_site = rule.aggregate(deltas, weights)
    assert list(from_sums) == list(per_site)
    for key, value in per_site.items():
        assert from_sums[key].dtype == torch.float32
        torch.testing.assert_close(from_sums[key], value, rtol=1e-6, atol=1e-6)


def test_exact_is_not_sum_only_and_says_to_use_sealed_mode() -> None:
    assert [name for name, rule in RULES.items() if not rule.sum_only] == ["exact"]
    with pytest.raises(ConfigError, match=r"'exact' needs each site's delta.*'sealed'"):
        sum_only_aggregate(get_rule("exact"), site_state(0, 8), 1.0)


@pytest.mark.parametrize("total", [0.0, -1.0, math.inf, math.nan])
def test_sum_only_aggregate_refuses_unusable_total_weight(total: float) -> None:
    with pytest.raises(AggregationError, match="total weight"):
        sum_only_aggregate(get_rule("fedavg"), site_state(0, 8), total)


def test_sum_only_aggregate_runs_the_payload_check() -> None:
    with pytest.raises(UpdateRejected, match=r"ffa: .*lora_A.*non-zero"):
        sum_only_aggregate(get_rule("ffa"), site_state(0, 8), 2.0)
    with pytest.raises(UpdateRejected, match=r"fedsa: .*lora_B"):
        sum_only_aggregate(get_rule("fedsa"), site_state(0, 8), 2.0)
    noisy = site_state(0, 8)
    noisy[HEAD][0, 0] = math.inf
    with pytest.raises(UpdateRejected, match=r"weighted sum tensor .*score.* 1 Inf"):
        sum_only_aggregate(get_rule("fedavg"), noisy, 2.0)


# --- registry and keys -----------------------------------------------------------------------


def test_get_rule_names_the_config_key_and_the_rules() -> None:
    assert {name: RULES[name].sum_only for name in RULES} == {
        "fedavg": True,
        "ffa": True,
        "fedsa": True,
        "exact": False,
    }
    with pytest.raises(ConfigError, match=r"aggregation.rule = 'fedprox'.*'exact', 'fedavg'"):
        get_rule("fedprox")


def test_lora_keys_are_recognised_as_peft_saves_them() -> None:
    assert lora_factor("m.layers.0.q_proj.lora_A.weight") == "A"
    assert lora_factor("m.layers.0.q_proj.lora_B.weight") == "B"
    assert lora_factor("m.embed_tokens.lora_embedding_A") == "A"
    assert lora_factor("m.layers.0.q_proj.lora_magnitude_vector") is None
    assert lora_factor(HEAD) is None
    keys = ["x.lora_embedding_A", "x.lora_embedding_B", "y.lora_A.weight", "y.lora_B.weight"]
    assert lora_pairs(keys) == [
        ("x.lora_embedding_A", "x.lora_embedding_B"),
        ("y.lora_A.weight", "y.lora_B.weight"),
    ]
    with pytest.raises(UpdateRejected, match=r"'z\.lora_B\.weight' has no matching lora_A"):
        lora_pairs([*keys, "z.lora_B.weight"])
