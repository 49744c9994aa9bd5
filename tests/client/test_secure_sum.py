"""Distributed DP at the site, observed on what the site really keeps for its masked input.

The accountant assumes that the sum the coordinator unmasks carries Gaussian noise of std
``sigma * C``. These tests check the noise itself, not the bookkeeping: each site's stage 1
(``client.secure_sum.start_round``) is run on a zero delta, and the vector it keeps for
masking is measured.

False-failure rate: the sample std of n iid normal draws has a relative standard error of
``1 / sqrt(2 n)``; a bound of 6 standard errors fails a correct implementation with
probability about 2e-9 per check.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, RecordDict

from client.secure_sum import DELTA_RECORD, start_round
from client.site_api import SiteUpdate, TrainResult
from common import protocol as P
from common.config import RunConfig, fewest_survivors, load_config, site_plan
from common.secagg import params_for
from server.secure_sum import secagg_params

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.toml"
SIGMA, CLIP = 0.8, 0.5
SHAPE = (200, 500)  # 100,000 coordinates per site
SE_BOUND = 6.0


def _config(sites: int) -> RunConfig:
    return load_config(
        TINY,
        [
            f"federation.sites={sites}",
            "privacy.mode='secure-sum'",
            "privacy.dp.enabled=true",
            "privacy.dp.placement='distributed'",
            f"privacy.dp.clip={CLIP}",
            f"privacy.dp.noise-multiplier={SIGMA}",
        ],
    )


def _plan_and_floor(sites: int) -> tuple[float, int]:
    cfg = _config(sites)
    return site_plan(cfg).site_noise_std, fewest_survivors(cfg)


def _unmask_floor(sites: int) -> int:
    """The fewest survivors a round can be unmasked with, from the secure-sum parameters the
    coordinator sends (the Shamir threshold), not from the config's own noise formula."""
    return max(2, secagg_params(_config(sites), sites).threshold)


def _kept_vector(site: int, sites: int, noise_std: float) -> np.ndarray:
    """Stage 1 at ``site-<site>`` on a zero delta; the vector it keeps for its masked input."""
    params = params_for(sites, CLIP + 6 * SIGMA * CLIP, 1.0)
    header = ConfigRecord(
        {
            P.KEY_RUN_ID: "run",
            P.KEY_ROUND: 1,
            P.KEY_MODULE: "shared",
            P.KEY_VERSION: 0,
            P.KEY_FINGERPRINT: "f" * 64,
            P.KEY_SECAGG_PARAMS: json.dumps(dataclasses.asdict(params)),
            P.KEY_SITE_NUMBERS: json.dumps({f"site-{i}": i + 1 for i in range(sites)}),
        }
    )
    context = Context(run_id=1, node_id=site, node_config={}, state=RecordDict(), run_config={})
    result = TrainResult(
        loss=0.0, first_loss=0.0, last_loss=0.0, steps=1, seconds=0.0, peak_memory_bytes=0
    )
    update = SiteUpdate({"shared/w.lora_A.weight": torch.zeros(SHAPE)}, 10, result)
    signing = Ed25519PrivateKey.generate()
    start_round(context, header, f"site-{site}", signing, update, noise_std, peer_keys={})
    return context.state.array_records[DELTA_RECORD].to_numpy_ndarrays()[0].astype(np.float64)


def _check_std(values: np.ndarray, expected: float) -> None:
    n = values.size
    assert abs(values.mean()) <= SE_BOUND * expected / math.sqrt(n)
    assert abs(values.std() / expected - 1.0) <= SE_BOUND / math.sqrt(2 * n)


@pytest.mark.parametrize("sites", [3, 10])
def test_noise_is_sized_for_the_fewest_survivors_that_can_unmask(sites: int) -> None:
    noise_std, floor = _plan_and_floor(sites)
    # The Shamir threshold: (N - 1 + 1) // 2 + 1 in the default full graph, never fewer than 2.
    assert floor == max(2, sites // 2 + 1)
    assert noise_std == pytest.approx(SIGMA * CLIP / math.sqrt(floor), rel=1e-12)


@pytest.mark.parametrize("sites", [3, 10])
def test_each_site_adds_its_share_and_the_floor_sum_has_sigma_c(sites: int) -> None:
    noise_std, _ = _plan_and_floor(sites)
    floor = _unmask_floor(sites)
    kept = [_kept_vector(site, sites, noise_std) for site in range(floor)]
    for vector in kept:  # one site's noise, as the site adds it
        _check_std(vector, noise_std)
    # The fewest survivors that can complete a round: their sum has the std the accountant uses.
    _check_std(np.sum(kept, axis=0), SIGMA * CLIP)


def test_without_dp_the_site_keeps_its_exact_delta() -> None:
    assert np.all(_kept_vector(0, 3, 0.0) == 0.0)
