"""Known-answer, statistical and negative tests for common.dp (clipping, noise, accounting)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.adapters import AdapterState, delta_norm
from common.dp import (
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    add_gaussian_noise,
    central_noise_std,
    check_budget,
    clip_delta,
    composed_epsilon,
    coordinator_noise_std,
    distributed_noise_std,
    dp_aggregate_mean,
    noise_multiplier_for,
    rdp_epsilon,
    secure_generator,
    site_noise_std,
)
from common.errors import ConfigError, FedloraError, UpdateRejected

DELTA = 1e-5
# 10^6 draws: the sample std has a relative standard error of 1/sqrt(2 * 10^6) ~ 0.07%, so a
# 2% tolerance is ~30 standard errors wide and never flakes with a fixed seed.
NUM_SAMPLES = 1_000_000


def random_delta(seed: int, scale: float = 1.0) -> AdapterState:
    """A LoRA-shaped delta (two factors and a head) with entries ~ N(0, scale^2)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "layers.0.q_proj.lora_A.weight": torch.randn(4, 12, generator=gen) * scale,
        "layers.0.q_proj.lora_B.weight": torch.randn(10, 4, generator=gen) * scale,
        "score.modules_to_save.default.weight": torch.randn(3, 10, generator=gen) * scale,
    }


def zeros_delta(num_elements: int = NUM_SAMPLES) -> AdapterState:
    """A delta of zeros split over two tensors, so that noise is sampled across keys."""
    half = num_elements // 2
    return {"a": torch.zeros(half), "b": torch.zeros(num_elements - half, 1)}


def flat(state: AdapterState) -> np.ndarray:
    return np.concatenate([t.detach().double().numpy().ravel() for t in state.values()])


# --- clipping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.5, 3.0, 100.0])
def test_clip_delta_matches_numpy(clip: float) -> None:
    delta = random_delta(0)
    clipped, scale = clip_delta(delta, clip)
    x = flat(delta)
    norm = float(np.linalg.norm(x))
    assert delta_norm(clipped) == pytest.approx(min(norm, clip), rel=1e-6)
    assert scale == pytest.approx(min(1.0, clip / norm), rel=1e-12)
    # Same direction: the clipped vector is a positive multiple of the original.
    np.testing.assert_allclose(flat(clipped), x * scale, rtol=1e-6, atol=1e-7)
    assert all(t.dtype == torch.float32 for t in clipped.values())
    assert list(clipped) == list(delta)


def test_clip_delta_noop_below_bound_and_leaves_input() -> None:
    delta = random_delta(1, scale=1e-3)
    before = {k: v.clone() for k, v in delta.items()}
    clipped, scale = clip_delta(delta, 1.0)
    assert scale == 1.0
    for key in delta:
        assert torch.equal(clipped[key], before[key])
        assert torch.equal(delta[key], before[key])


def test_clip_delta_zero_and_half_precision() -> None:
    clipped, scale = clip_delta({"a": torch.zeros(3)}, 1.0)
    assert scale == 1.0 and torch.equal(clipped["a"], torch.zeros(3))
    half = {k: v.half() for k, v in random_delta(2).items()}
    clipped, _ = clip_delta(half, 0.25)
    assert delta_norm(clipped) == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_clip_delta_rejects_bad_bound(bad: float) -> None:
    with pytest.raises(ConfigError, match=r"^privacy\.dp\.clip is "):
        clip_delta(random_delta(0), bad)


def test_clip_delta_rejects_non_finite_and_integer() -> None:
    with pytest.raises(UpdateRejected, match="'a'"):
        clip_delta({"a": torch.tensor([1.0, math.nan])}, 1.0)
    with pytest.raises(UpdateRejected, match="dtype"):
        clip_delta({"a": torch.tensor([1, 2])}, 1.0)


@settings(max_examples=200, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(
            np.float32,
            hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
            elements=st.floats(-1e6, 1e6, width=32),
        ),
        min_size=1,
        max_size=4,
    ),
    clip=st.floats(1e-3, 1e3),
)
def test_clip_delta_norm_never_exceeds_bound(arrays: list[np.ndarray], clip: float) -> None:
    delta = {f"t{i}": torch.from_numpy(a.copy()) for i, a in enumerate(arrays)}
    clipped, scale = clip_delta(delta, clip)
    assert delta_norm(clipped) <= clip * (1 + 1e-5)
    assert 0.0 < scale <= 1.0


# --- noise ------------------------------------------------------------------------------------


def test_gaussian_noise_std_empirical() -> None:
    std = 0.37
    noisy = add_gaussian_noise(zeros_delta(), std, torch.Generator().manual_seed(0))
    x = flat(noisy)
    assert x.size == NUM_SAMPLES
    assert float(x.std()) == pytest.approx(std, rel=0.02)
    # Mean within 5 standard errors of 0.
    assert abs(float(x.mean())) < 5 * std / math.sqrt(NUM_SAMPLES)


def test_gaussian_noise_shapes_dtype_determinism_and_input_untouched() -> None:
    delta = {k: v.half() for k, v in random_delta(3).items()}
    before = {k: v.clone() for k, v in delta.items()}
    first = add_gaussian_noise(delta, 0.1, torch.Generator().manual_seed(7))
    second = add_gaussian_noise(delta, 0.1, torch.Generator().manual_seed(7))
    for key in delta:
        assert first[key].dtype == torch.float32
        assert first[key].shape == delta[key].shape
        assert torch.equal(first[key], second[key])
        assert torch.equal(delta[key], before[key])
        assert not torch.equal(first[key], delta[key].float())
    unchanged = add_gaussian_noise(delta, 0.0, torch.Generator().manual_seed(7))
    assert all(torch.equal(unchanged[k], delta[k].float()) for k in delta)


def test_gaussian_noise_a_key_gets_does_not_depend_on_the_mapping_order() -> None:
    """A resumed run holds its state in the checkpoint's (sorted) key order, the first run in
    the model's: both must draw the same noise for the same key, or resume is not exact."""
    delta = random_delta(5)
    reordered = dict(reversed(list(delta.items())))
    first = add_gaussian_noise(delta, 0.1, torch.Generator().manual_seed(3))
    second = add_gaussian_noise(reordered, 0.1, torch.Generator().manual_seed(3))
    assert list(first) == list(delta) and list(second) == list(reordered)
    for key in delta:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan])
def test_gaussian_noise_rejects_bad_std(bad: float) -> None:
    with pytest.raises(ConfigError, match="noise std"):
        add_gaussian_noise(random_delta(0), bad, torch.Generator())


def test_secure_generator_is_unpredictable() -> None:
    draws = [torch.randn(8, generator=secure_generator()) for _ in range(2)]
    assert not torch.equal(draws[0], draws[1])
    assert secure_generator().device == torch.device("cpu")


def test_noise_placements() -> None:
    sigma, clip = 1.2, 0.5
    assert central_noise_std(sigma, clip) == pytest.approx(0.6)
    assert distributed_noise_std(sigma, clip, 4) == pytest.approx(0.3)
    assert site_noise_std(sigma, clip, "central", 4) == 0.0
    assert coordinator_noise_std(sigma, clip, "central") == pytest.approx(0.6)
    assert site_noise_std(sigma, clip, "distributed", 4) == pytest.approx(0.3)
    assert coordinator_noise_std(sigma, clip, "distributed") == 0.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: site_noise_std(1.0, 1.0, "local", 3), "placement"),  # type: ignore[arg-type]
        (lambda: coordinator_noise_std(1.0, 1.0, "x"), "placement"),  # type: ignore[arg-type]
        (lambda: distributed_noise_std(1.0, 1.0, 0), "min-sites"),
        (lambda: distributed_noise_std(1.0, 1.0, True), "min-sites"),
        (lambda: central_noise_std(0.0, 1.0), r"^privacy\.dp\.noise-multiplier is 0\.0, "),
        (lambda: site_noise_std(1.0, -1.0, "central", 3), r"^privacy\.dp\.clip is -1\.0, "),
        (lambda: PrivacyAccountant(-1.0, 1.0, DELTA), r"^privacy\.dp\.noise-multiplier is "),
        (lambda: PrivacyAccountant(1.0, 0.0, DELTA), r"^sampling rate \(cohort / total "),
        (lambda: PrivacyAccountant(1.0, 1.0, 1.0), r"^privacy\.dp\.delta is 1\.0, "),
    ],
)
def test_noise_std_rejects_bad_parameters(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


def test_one_survivor_in_distributed_mode_adds_all_the_noise() -> None:
    # min-sites 1: the lone guaranteed survivor must add the central std by itself.
    assert distributed_noise_std(1.2, 0.5, 1) == pytest.approx(central_noise_std(1.2, 0.5))


def test_gaussian_noise_of_a_float64_delta_is_float32() -> None:
    delta = {key: tensor.double() for key, tensor in random_delta(0).items()}
    noisy = add_gaussian_noise(delta, 0.1, torch.Generator().manual_seed(0))
    assert all(tensor.dtype == torch.float32 for tensor in noisy.values())


@pytest.mark.parametrize(("num_sites", "min_sites"), [(5, 5), (3, 3)])
def test_distributed_noise_sums_to_target_std(num_sites: int, min_sites: int) -> None:
    sigma, clip = 1.1, 0.8
    per_site = distributed_noise_std(sigma, clip, min_sites)
    total = np.zeros(NUM_SAMPLES)
    for site in range(num_sites):
        # Each site has its own generator, as it would in production.
        noise = add_gaussian_noise(zeros_delta(), per_site, torch.Generator().manual_seed(site))
        total += flat(noise)
    assert float(total.std()) == pytest.approx(sigma * clip, rel=0.02)


def test_distributed_noise_more_survivors_more_noise() -> None:
    sigma, clip = 1.0, 1.0
    per_site = distributed_noise_std(sigma, clip, 3)
    total = sum(
        flat(add_gaussian_noise(zeros_delta(), per_site, torch.Generator().manual_seed(s)))
        for s in range(5)
    )
    # Five survivors of noise sized for three: std sqrt(5/3) * sigma * C, never less.
    assert float(np.std(total)) == pytest.approx(math.sqrt(5 / 3), rel=0.02)


def test_dp_aggregate_mean_fixed_denominator() -> None:
    deltas = [clip_delta(random_delta(s), 1.0)[0] for s in range(3)]
    summed = {k: torch.stack([d[k] for d in deltas]).sum(0) for k in deltas[0]}
    mean = dp_aggregate_mean(summed, 0.0, num_sites_expected=4)
    for key in summed:
        # Divided by the expected cohort (4), not by the 3 sites that answered.
        torch.testing.assert_close(mean[key], summed[key] / 4)
    noisy = dp_aggregate_mean(zeros_delta(), 2.0, 4.0, torch.Generator().manual_seed(1))
    assert float(flat(noisy).std()) == pytest.approx(0.5, rel=0.02)
    # Without a generator, production noise is drawn from a fresh secure generator.
    secure = dp_aggregate_mean(random_delta(0), 1.0, 2.0)
    assert all(t.dtype == torch.float32 for t in secure.values())


def test_dp_aggregate_mean_without_a_generator_adds_noise_of_the_given_std() -> None:
    # A std below 1 and no generator: the production path must still draw noise. 2 * 10^5
    # draws: relative standard error of the sample std ~0.16%, so 3% is ~19 standard errors.
    noisy = dp_aggregate_mean(zeros_delta(200_000), 0.5, 1.0)
    assert float(flat(noisy).std()) == pytest.approx(0.5, rel=0.03)


def test_dp_aggregate_mean_draws_its_noise_from_the_generator_it_is_given() -> None:
    # A resumed run passes its restored generator: the noise must come from it, not a fresh one.
    delta = random_delta(0)
    mean = dp_aggregate_mean(delta, 0.7, 2.0, torch.Generator().manual_seed(5))
    expected = add_gaussian_noise(delta, 0.7, torch.Generator().manual_seed(5))
    for key in delta:
        torch.testing.assert_close(mean[key], expected[key] / 2.0, rtol=0, atol=0)


def test_dp_aggregate_mean_without_noise_returns_float32() -> None:
    summed = {key: tensor.double() for key, tensor in random_delta(0).items()}
    mean = dp_aggregate_mean(summed, 0.0, 2.0)
    assert all(tensor.dtype == torch.float32 for tensor in mean.values())


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan])
def test_dp_aggregate_mean_rejects_bad_denominator(bad: float) -> None:
    with pytest.raises(ConfigError, match=r"^expected cohort size is "):
        dp_aggregate_mean(random_delta(0), 0.0, bad)


# --- accounting -------------------------------------------------------------------------------


def direct_epsilon(sigma: float, rounds: int, q: float = 1.0) -> float:
    """Epsilon from dp_accounting directly: ``rounds`` compositions through ``compose(count=)``."""
    accountant = rdp.RdpAccountant()
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(DELTA))


@pytest.mark.parametrize("rounds", [1, 10])
def test_epsilon_matches_direct_dp_accounting(rounds: int) -> None:
    accountant = PrivacyAccountant(1.0, 1.0, DELTA)
    accountant.step(rounds)
    epsilon = accountant.epsilon()
    assert epsilon == pytest.approx(direct_epsilon(1.0, rounds), rel=1e-9)
    # Analytic bracket for T rounds of the Gaussian mechanism with sigma = 1 (q = 1), which is
    # one Gaussian mechanism with sigma / sqrt(T): the exact epsilon (Balle and Wang 2018) is a
    # lower bound; Mironov's RDP conversion rho + 2 sqrt(rho log(1/delta)), rho = T / (2
    # sigma^2), is an upper bound (dp_accounting uses a tighter conversion).
    exact = dp_accounting.get_epsilon_gaussian(1.0 / math.sqrt(rounds), DELTA)
    rho = rounds / 2.0
    assert exact < epsilon <= rho + 2 * math.sqrt(rho * math.log(1 / DELTA))


def test_composed_epsilon_adds_runs_at_different_multipliers() -> None:
    """RDP of the Gaussian mechanism is alpha / (2 sigma^2) per round, so 2 rounds at sigma 1
    and 4 at sigma 2 are one round at 1 / sigma^2 = 2 / 1 + 4 / 4 = 3."""
    assert composed_epsilon(((1.0, 2), (2.0, 4)), DELTA) == pytest.approx(
        rdp_epsilon(1 / math.sqrt(3), 1.0, DELTA, 1), rel=1e-9
    )
    assert composed_epsilon(((1.0, 3),), DELTA) == pytest.approx(direct_epsilon(1.0, 3), rel=1e-9)
    assert composed_epsilon(((1.0, 1), (1.0, 2)), DELTA) == pytest.approx(
        direct_epsilon(1.0, 3), rel=1e-9
    )
    assert composed_epsilon((), DELTA) == 0.0
    with pytest.raises(ConfigError, match="noise-multiplier"):
        composed_epsilon(((0.0, 1),), DELTA)


def test_epsilon_with_sampling_matches_direct() -> None:
    accountant = PrivacyAccountant(0.9, 0.05, DELTA, rounds=200)
    assert accountant.epsilon() == pytest.approx(direct_epsilon(0.9, 200, 0.05), rel=1e-9)
    assert accountant.epsilon() < PrivacyAccountant(0.9, 1.0, DELTA, rounds=200).epsilon()


def test_epsilon_monotone_in_sigma_and_rounds() -> None:
    by_sigma = [PrivacyAccountant(s, 1.0, DELTA, rounds=10).epsilon() for s in (0.5, 1, 2, 4)]
    assert by_sigma == sorted(by_sigma, reverse=True)
    assert len(set(by_sigma)) == len(by_sigma)
    accountant = PrivacyAccountant(1.0, 0.1, DELTA)
    by_rounds = [accountant.epsilon_after(r) for r in (0, 1, 5, 50, 500)]
    assert by_rounds[0] == 0.0
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == len(by_rounds)


def test_epsilon_dp_sgd_known_settings() -> None:
    # Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1: q = 0.01,
    # sigma = 4, delta = 1e-5, T = 10,000 gives epsilon ~ 1.26 with the moments accountant;
    # RDP with more orders and a tighter conversion can only be lower, and not by much.
    assert 0.8 < PrivacyAccountant(4.0, 0.01, DELTA, rounds=10_000).epsilon() <= 1.26
    # The sigma ~ 1.1 of TF Privacy's DP-SGD tutorials, same q and T: a few units of epsilon.
    assert 1.0 < PrivacyAccountant(1.1, 0.01, DELTA, rounds=10_000).epsilon() < 10.0


def test_epsilon_after_does_not_mutate() -> None:
    accountant = PrivacyAccountant(1.0, 1.0, DELTA, rounds=3)
    spent = accountant.epsilon()
    accountant.epsilon_after(100)
    assert accountant.rounds == 3 and accountant.epsilon() == spent
    accountant.step()
    assert accountant.rounds == 4 and accountant.epsilon() == accountant.epsilon_after(4)


def test_accountant_state_roundtrip() -> None:
    accountant = PrivacyAccountant(1.3, 0.25, 1e-6)
    accountant.step(7)
    text = json.dumps(accountant.state())
    restored = PrivacyAccountant.from_state(json.loads(text))
    assert restored.state() == accountant.state()
    assert restored.rounds == 7
    assert restored.epsilon() == accountant.epsilon()
    assert "rounds=7" in repr(restored)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"accountant": "pld"}, "accountant='pld'"),
        ({"rounds": -1}, "rounds"),
        ({"rounds": 2.5}, "rounds"),
        ({"delta": 0.0}, r"privacy\.dp\.delta"),
        ({"sampling_rate": 1.5}, "sampling rate"),
        ({"noise_multiplier": 0}, "noise-multiplier"),
    ],
)
def test_accountant_from_state_rejects_bad_state(change: dict[str, object], match: str) -> None:
    state = {**PrivacyAccountant(1.0, 1.0, DELTA).state(), **change}
    with pytest.raises(ConfigError, match=match):
        PrivacyAccountant.from_state(state)


def test_accountant_from_state_rejects_missing_key() -> None:
    state = PrivacyAccountant(1.0, 1.0, DELTA).state()
    del state["delta"]
    with pytest.raises(ConfigError, match="lacks \\['delta'\\]"):
        PrivacyAccountant.from_state(state)


def test_accountant_rejects_bad_step() -> None:
    with pytest.raises(ConfigError, match="rounds"):
        PrivacyAccountant(1.0, 1.0, DELTA).step(-1)


def test_check_budget_raises_exactly_before_the_exceeding_round() -> None:
    accountant = PrivacyAccountant(1.0, 1.0, DELTA)
    budget = accountant.epsilon_after(5)  # five rounds fit exactly, the sixth does not
    for _ in range(5):
        check_budget(accountant, budget)
        accountant.step()
    assert accountant.epsilon() == budget
    with pytest.raises(PrivacyBudgetExceeded, match=r"epsilon-budget.*train longer\)$") as caught:
        check_budget(accountant, budget)
    assert isinstance(caught.value, FedloraError)
    assert caught.value.budget == budget
    assert caught.value.rounds == 5
    assert caught.value.spent == budget
    assert caught.value.next_epsilon == accountant.epsilon_after(6) > budget


def test_check_budget_without_budget_and_bad_budget() -> None:
    accountant = PrivacyAccountant(0.1, 1.0, DELTA, rounds=1000)
    check_budget(accountant, None)
    with pytest.raises(ConfigError, match=r"^privacy\.dp\.epsilon-budget is -1\.0, expected"):
        check_budget(accountant, -1.0)


@pytest.mark.parametrize(
    ("epsilon", "rounds", "q"), [(1.0, 1, 1.0), (3.0, 50, 1.0), (2.0, 200, 0.05)]
)
def test_noise_multiplier_for_inverts_epsilon(epsilon: float, rounds: int, q: float) -> None:
    sigma = noise_multiplier_for(epsilon, DELTA, rounds, q)
    reached = PrivacyAccountant(sigma, q, DELTA).epsilon_after(rounds)
    assert reached <= epsilon
    assert reached == pytest.approx(epsilon, rel=0.01)
    # Minimal: 1% less noise overshoots the target.
    assert PrivacyAccountant(sigma * 0.99, q, DELTA).epsilon_after(rounds) > epsilon


def test_noise_multiplier_for_rejects_impossible_targets() -> None:
    with pytest.raises(ConfigError, match=r"^rounds is 0: any noise multiplier meets the budget$"):
        noise_multiplier_for(1.0, DELTA, 0)
    with pytest.raises(ConfigError, match=r"^target epsilon is 0\.0, "):
        noise_multiplier_for(0.0, DELTA, 10)
    with pytest.raises(ConfigError, match="no noise multiplier"):
        noise_multiplier_for(1e-12, DELTA, 10**6)
