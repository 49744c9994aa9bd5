"""SCAFFOLD at the coordinator: known answers for the control variate ``c``, and its limits.

``c`` is the example-weighted mean of the sites' estimates: every round adds
``(|S| / N) * sum_i w_i dc_i / sum_i w_i`` over the accepted sites ``S`` of ``N``. The sealed
form (one change per site) and the secure-sum form (the unmasked weighted sum) must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import load_config
from common.errors import ConfigError
from server.aggregate import CONTROL_PREFIX, Aggregator

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.toml"
KEY = "shared/m.lora_B.weight"
SCAFFOLD = ["federation.sites=4", "train.scaffold=true"]


def _change(value: float) -> dict[str, torch.Tensor]:
    return {KEY: torch.full((2,), value)}


def test_c_is_the_weighted_mean_and_accumulates_over_rounds() -> None:
    aggregator = Aggregator(load_config(TINY, SCAFFOLD))
    aggregator.update_control([(10, _change(1.0)), (30, _change(5.0)), (10, _change(-1.0)),
                               (50, _change(2.0))])  # fmt: skip
    assert aggregator.control is not None
    first = (10 * 1.0 + 30 * 5.0 + 10 * -1.0 + 50 * 2.0) / 100  # every site: |S| / N = 1
    assert aggregator.control[KEY].tolist() == pytest.approx([first, first])
    # Round 2: two of the four sites answer; their mean counts for half.
    aggregator.update_control([(10, _change(4.0)), (30, _change(0.0))])
    assert aggregator.control[KEY].tolist() == pytest.approx([first + 0.5 * 1.0] * 2)


def test_secure_sum_form_equals_the_sealed_form() -> None:
    sealed, summed = (Aggregator(load_config(TINY, SCAFFOLD)) for _ in range(2))
    changes = [(10, _change(1.0)), (30, _change(5.0)), (20, _change(-3.0))]
    sealed.update_control(changes)
    weighted_sum = {KEY: torch.stack([n * c[KEY] for n, c in changes]).sum(0)}
    summed.update_control_from_sum(weighted_sum, total_weight=60.0, count=3)
    assert sealed.control is not None and summed.control is not None
    assert torch.allclose(sealed.control[KEY], summed.control[KEY])
    assert sealed.control[KEY][0].item() == pytest.approx(0.75 * (10 + 150 - 60) / 60)


def test_c_goes_into_the_checkpoint_and_comes_back() -> None:
    cfg = load_config(TINY, SCAFFOLD)
    aggregator = Aggregator(cfg)
    aggregator.update_control([(10, _change(2.0))])
    tensors, meta = aggregator.state_tensors(), aggregator.state_meta()
    assert set(tensors) >= {CONTROL_PREFIX + KEY}
    restored = Aggregator(cfg)
    restored.load_state(tensors, meta)
    assert restored.control is not None
    assert torch.equal(restored.control[KEY], torch.full((2,), 0.5))


def test_off_by_default_and_sends_no_c() -> None:
    aggregator = Aggregator(load_config(TINY))
    assert aggregator.control is None
    aggregator.update_control([(10, _change(2.0))])  # ignored
    assert not any(k.startswith(CONTROL_PREFIX) for k in aggregator.state_tensors())


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["aggregation.rule='exact'"], "aggregation.rule = 'exact'"),
        (["aggregation.robust='median'"], "aggregation.robust = 'median'"),
        (["aggregation.server-clip=1.0"], "aggregation.server-clip"),
        (["privacy.dp.enabled=true", "privacy.dp.clip=1.0"], "privacy.dp"),
    ],
)
def test_settings_that_are_not_a_weighted_mean_are_refused(extra: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.scaffold needs the weighted mean") as info:
        load_config(TINY, [*SCAFFOLD, *extra])
    assert named in str(info.value)
