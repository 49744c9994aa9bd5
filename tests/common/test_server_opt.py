"""Known-answer, resume and negative tests for common.server_opt (references in numpy)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from common.adapters import AdapterState, apply_delta
from common.config import AggregationConfig
from common.errors import ConfigError, UpdateRejected
from common.server_opt import (
    ServerOptimizer,
    lr_factor,
    make_server_optimizer,
    server_optimizer_for,
)

SHAPES = {
    "layers.0.q_proj.lora_A.weight": (4, 12),
    "layers.0.q_proj.lora_B.weight": (10, 4),
    "score.weight": (3, 12),
}
KEYS = tuple(SHAPES)


def random_state(seed: int, scale: float = 1.0) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    return {key: scale * torch.randn(*shape, generator=gen) for key, shape in SHAPES.items()}


def deltas(count: int) -> list[AdapterState]:
    return [random_state(100 + step, scale=0.1) for step in range(count)]


def numpy_of(state: AdapterState) -> dict[str, np.ndarray]:
    return {key: tensor.double().numpy() for key, tensor in state.items()}


def numpy_of_all(states: list[AdapterState]) -> list[dict[str, np.ndarray]]:
    return [numpy_of(state) for state in states]


def run(optimizer: ServerOptimizer, start: AdapterState, steps: list[AdapterState]) -> AdapterState:
    state = start
    for delta in steps:
        state = optimizer.step(state, delta)
    return state


def assert_close_to(state: AdapterState, expected: dict[str, np.ndarray]) -> None:
    for key, value in expected.items():
        assert state[key].dtype == torch.float32
        np.testing.assert_allclose(state[key].double().numpy(), value, rtol=1e-5, atol=1e-6)


# --- known answers ---------------------------------------------------------------------------


def test_sgd_with_lr_one_is_plain_apply() -> None:
    start, delta = random_state(0), random_state(1)
    moved = make_server_optimizer("sgd", lr=1.0).step(start, delta)
    plain = apply_delta(start, delta)
    assert all(torch.equal(moved[key], plain[key]) for key in KEYS)


def test_sgd_scales_by_lr() -> None:
    start, steps = random_state(0), deltas(3)
    expected = numpy_of(start)
    for delta in numpy_of_all(steps):
        expected = {key: expected[key] + 0.5 * delta[key] for key in expected}
    assert_close_to(run(make_server_optimizer("sgd", lr=0.5), start, steps), expected)


def test_fedavgm_matches_a_numpy_reference_for_three_steps() -> None:
    start, steps = random_state(0), deltas(3)
    lr, beta = 0.7, 0.9
    x, m = numpy_of(start), {key: np.zeros(shape) for key, shape in SHAPES.items()}
    for delta in numpy_of_all(steps):
        m = {key: beta * m[key] + delta[key] for key in KEYS}
        x = {key: x[key] + lr * m[key] for key in KEYS}
    optimizer = make_server_optimizer("fedavgm", lr=lr, momentum=beta)
    assert_close_to(run(optimizer, start, steps), x)
    assert optimizer.steps == 3


def test_fedadam_matches_a_numpy_reference_for_three_steps() -> None:
    start, steps = random_state(0), deltas(3)
    lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    x = numpy_of(start)
    m = {key: np.zeros(shape) for key, shape in SHAPES.items()}
    v = {key: np.zeros(shape) for key, shape in SHAPES.items()}
    for delta in numpy_of_all(steps):
        m = {key: b1 * m[key] + (1 - b1) * delta[key] for key in KEYS}
        v = {key: b2 * v[key] + (1 - b2) * delta[key] ** 2 for key in KEYS}
        x = {key: x[key] + lr * m[key] / (np.sqrt(v[key]) + tau) for key in KEYS}
    optimizer = make_server_optimizer("fedadam", lr=lr, beta1=b1, beta2=b2, tau=tau)
    assert_close_to(run(optimizer, start, steps), x)


def test_default_fedadam_tau_is_the_papers() -> None:
    assert make_server_optimizer("fedadam").hyperparameters()["tau"] == 1e-3


def test_step_keeps_the_global_dtype_and_leaves_inputs_unchanged() -> None:
    start = {key: tensor.to(torch.bfloat16) for key, tensor in random_state(0).items()}
    delta = random_state(1)
    before = {key: tensor.clone() for key, tensor in delta.items()}
    moved = make_server_optimizer("fedadam", lr=0.01).step(start, delta)
    assert all(moved[key].dtype == torch.bfloat16 for key in KEYS)
    assert all(torch.equal(delta[key], before[key]) for key in KEYS)


# --- checkpoint and resume -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "fedavgm", "fedadam"])
def test_state_dict_roundtrip_continues_bit_identically(name: str) -> None:
    start, steps = random_state(0), deltas(4)
    straight = make_server_optimizer(name, lr=0.05)
    uninterrupted = run(straight, start, steps)

    first = make_server_optimizer(name, lr=0.05)
    halfway = run(first, start, steps[:2])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_server_optimizer(name, lr=0.05)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.steps == 2
    finished = run(resumed, halfway, steps[2:])
    assert all(torch.equal(finished[key], uninterrupted[key]) for key in KEYS)
    assert resumed.state_dict().keys() == straight.state_dict().keys()


def test_state_dict_is_a_copy() -> None:
    optimizer = make_server_optimizer("fedavgm", lr=1.0, momentum=0.5)
    optimizer.step(random_state(0), random_state(1))
    saved = optimizer.state_dict()
    snapshot = {key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in saved.items()}
    optimizer.step(random_state(0), random_state(2))
    for key, value in snapshot.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(saved[key], value)
    assert saved["steps"] == 1 and f"m/{KEYS[0]}" in saved


def test_load_refuses_other_hyperparameters() -> None:
    saved = make_server_optimizer("fedadam", lr=0.01).state_dict()
    with pytest.raises(ConfigError, match=r"aggregation.server-beta2 = 0.999.*written with 0.99"):
        make_server_optimizer("fedadam", lr=0.01, beta2=0.999).load_state_dict(saved)


def test_load_refuses_another_optimizers_checkpoint() -> None:
    adam = make_server_optimizer("fedadam", lr=0.01)
    adam.step(random_state(0), random_state(1))
    with pytest.raises(ConfigError, match=r"holds \['beta1'.*server-optimizer = 'fedavgm'"):
        make_server_optimizer("fedavgm", lr=0.01).load_state_dict(adam.state_dict())
    momentum = make_server_optimizer("fedavgm", lr=0.01)
    momentum.step(random_state(0), random_state(1))
    saved = {**momentum.state_dict(), "v/extra": torch.zeros(2)}
    with pytest.raises(ConfigError, match=r"'v/extra' is not a tensor slot"):
        momentum.load_state_dict(saved)


def test_load_refuses_slots_that_disagree() -> None:
    adam = make_server_optimizer("fedadam", lr=0.01)
    adam.step(random_state(0), random_state(1))
    saved = adam.state_dict()
    del saved[f"v/{KEYS[0]}"]
    with pytest.raises(ConfigError, match="slots hold different tensors"):
        make_server_optimizer("fedadam", lr=0.01).load_state_dict(saved)


# --- validation ------------------------------------------------------------------------------


def test_unknown_optimizer_names_the_config_key() -> None:
    with pytest.raises(ConfigError, match=r"aggregation.server-optimizer = 'fedyogi'.*'fedadam'"):
        make_server_optimizer("fedyogi")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "sgd", "lr": 0.0}, r"aggregation.server-lr = 0.0, expected a number > 0"),
        ({"name": "sgd", "lr": math.nan}, r"aggregation.server-lr = nan"),
        ({"name": "fedavgm", "momentum": 1.0}, r"server-momentum = 1.0, .* >= 0 and < 1"),
        ({"name": "fedadam", "beta1": -0.1}, r"aggregation.server-beta1 = -0.1"),
        ({"name": "fedadam", "beta2": 1.5}, r"aggregation.server-beta2 = 1.5"),
        ({"name": "fedadam", "tau": 0.0}, r"aggregation.server-tau = 0.0, expected a number > 0"),
    ],
)
def test_hyperparameters_out_of_range_name_their_key(
    settings: dict[str, float | str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_server_optimizer(**settings)  # type: ignore[arg-type]


def test_a_mismatched_delta_leaves_the_state_unchanged() -> None:
    optimizer = make_server_optimizer("fedadam", lr=0.01)
    optimizer.step(random_state(0), random_state(1))
    saved = optimizer.state_dict()
    bad = random_state(2)
    bad[KEYS[2]] = torch.full((3, 12), math.inf)
    with pytest.raises(UpdateRejected, match=r"score\.weight.*Inf"):
        optimizer.step(random_state(0), bad)
    del bad[KEYS[2]]
    with pytest.raises(UpdateRejected, match="missing"):
        optimizer.step(random_state(0), bad)
    after = optimizer.state_dict()
    assert after["steps"] == 1
    assert all(torch.equal(v, after[k]) for k, v in saved.items() if isinstance(v, torch.Tensor))


# --- learning-rate schedule ------------------------------------------------------------------


def test_cosine_factor_known_values() -> None:
    assert lr_factor("constant", 0.1, 10, 7) == 1.0
    assert lr_factor("cosine", 0.1, 5, 0) == 1.0
    assert lr_factor("cosine", 0.1, 5, 2) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_factor("cosine", 0.1, 5, 4) == pytest.approx(0.1)
    assert lr_factor("cosine", 0.1, 5, 9) == pytest.approx(0.1)  # past the end: stays
    assert lr_factor("cosine", 0.1, 1, 0) == 1.0
    with pytest.raises(ConfigError, match="server-lr-schedule"):
        lr_factor("linear", 0.1, 5, 0)


def test_wsd_factor_is_constant_then_decays_linearly_over_the_last_fifth() -> None:
    # 50 rounds: steps 0-39 at 1, then 10 steps from 0.91 down to 0.1 at the last step.
    factors = [lr_factor("wsd", 0.1, 50, step) for step in range(52)]
    assert factors[:40] == [1.0] * 40
    assert factors[40:50] == pytest.approx([1 - 0.9 * k / 10 for k in range(1, 11)])
    assert factors[50:] == pytest.approx([0.1, 0.1])  # past the end: stays
    # Few rounds: at least the last step decays.
    assert [lr_factor("wsd", 0.5, 3, s) for s in range(3)] == pytest.approx([1.0, 1.0, 0.5])
    assert lr_factor("wsd", 0.1, 1, 0) == 1.0


def test_cosine_schedule_scales_each_sgd_step() -> None:
    """SGD moves by lr * factor(step) * delta: the known answer over 3 steps."""
    optimizer = make_server_optimizer("sgd", lr=1.0)
    optimizer.set_schedule("cosine", 0.2, 3)
    state, delta = random_state(0), random_state(1)
    moved = state
    for step in range(3):
        factor = [1.0, 0.6, 0.2][step]
        expected = {k: moved[k] + factor * delta[k] for k in KEYS}
        moved = optimizer.step(moved, delta)
        assert all(torch.allclose(moved[k], expected[k], atol=1e-6) for k in KEYS)


def test_config_schedules_over_the_run_and_resume_checks_it() -> None:
    agg = AggregationConfig(server_optimizer="fedadam", server_lr=0.01, server_lr_schedule="cosine")
    optimizer = server_optimizer_for(agg, 30)
    assert optimizer.current_lr() == pytest.approx(0.01)
    start, steps = random_state(0), deltas(2)
    run(optimizer, start, steps)
    assert optimizer.current_lr() == pytest.approx(0.01 * lr_factor("cosine", 0.1, 30, 2))
    saved = optimizer.state_dict()
    server_optimizer_for(agg, 30).load_state_dict(saved)  # same run: resumes
    with pytest.raises(ConfigError, match=r"federation.rounds = 40\.0"):
        server_optimizer_for(agg, 40).load_state_dict(saved)
    # A constant-lr checkpoint (written before schedules existed) still loads.
    constant = AggregationConfig(server_optimizer="fedadam", server_lr=0.01)
    server_optimizer_for(constant, 30).load_state_dict(
        server_optimizer_for(constant, 30).state_dict()
    )
