"""A site's round, in process (no Flower): delta semantics, determinism, base integrity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.site import SiteRuntime
from common.adapter_host import AdapterHost
from common.adapters import apply_delta
from common.config import RunConfig, load_config, site_plan
from common.data import load_dataset
from common.errors import FingerprintMismatch
from common.fingerprint import fingerprint
from common.modules import join_modules
from common.partition import site_data


@pytest.fixture
def cfg(examples_dir: Path) -> RunConfig:
    return load_config(examples_dir / "tiny.toml")


def _runtime(cfg: RunConfig, site: int = 0) -> SiteRuntime:
    dataset = load_dataset(cfg.data)
    host = AdapterHost(cfg.model, cfg.modules, None)
    data = site_data(dataset, site, cfg.federation.sites, cfg.data)
    return SiteRuntime(host, data, dataset.kind, f"site-{site}", site)


def test_delta_is_trained_minus_received_and_base_is_untouched(cfg: RunConfig) -> None:
    site = _runtime(cfg)
    received = join_modules(site.host.initial)
    before = site.fingerprint
    update = site.train(received, site_plan(cfg), server_round=1, version=0)
    trained = join_modules(site.host.states())
    for key, value in apply_delta(received, update.delta).items():
        torch.testing.assert_close(value, trained[key])
    assert any(float(d.abs().max()) > 0 for d in update.delta.values())
    assert update.examples == len(site.data.train)
    assert update.result.steps == cfg.train.local_steps
    assert fingerprint(site.host.model, site.host.base.tokenizer) == before


def test_training_is_deterministic_for_a_seed(cfg: RunConfig) -> None:
    site = _runtime(cfg)
    received = join_modules(site.host.initial)
    plan = site_plan(cfg)
    first = site.train(received, plan, server_round=1, version=0).delta
    second = site.train(received, plan, server_round=1, version=0).delta
    other_round = site.train(received, plan, server_round=2, version=0).delta
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert any(not torch.equal(first[k], other_round[k]) for k in first)


def test_evaluate_gives_finite_loss(cfg: RunConfig) -> None:
    site = _runtime(cfg)
    result = site.evaluate(join_modules(site.host.initial), site_plan(cfg), 0)
    assert result.examples == len(site.data.heldout) > 0
    assert 0 < result.loss < 20 and result.tokens > 0
    assert result.accuracy is None


def test_foreign_base_is_refused_with_both_fingerprints(cfg: RunConfig) -> None:
    site = _runtime(cfg)
    with pytest.raises(FingerprintMismatch) as err:
        site.check_fingerprint("ab" * 32)
    assert "ab" * 32 in str(err.value) and site.fingerprint in str(err.value)


def _classification_site(examples_dir: Path, *overrides: str) -> tuple[RunConfig, SiteRuntime]:
    """Site 1 of banking77 over 3 sites, on a tiny random Llama classifier."""
    cfg = load_config(
        examples_dir / "banking77.toml",
        [
            "model.name=tiny-llama",
            "modules.shared.targets=['q_proj','v_proj']",
            "federation.sites=3",
            "data.partition='dirichlet'",
            "train.local-steps=2",
            "train.batch-size=8",
            "data.max-eval-examples=16",
            *overrides,
        ],
    )
    dataset = load_dataset(cfg.data)
    assert dataset.label_names is not None and len(dataset.label_names) == 77
    host = AdapterHost(cfg.model, cfg.modules, len(dataset.label_names))
    return cfg, SiteRuntime(host, site_data(dataset, 1, 3, cfg.data), dataset.kind, "site-1", 1)


def test_classification_site_reports_accuracy(examples_dir: Path) -> None:
    cfg, site = _classification_site(examples_dir)
    host = site.host
    received = join_modules(host.initial)
    assert any("score" in k for k in received), "the new classification head must be trained"
    update = site.train(received, site_plan(cfg), server_round=1, version=0)
    assert set(update.delta) == set(received)
    result = site.evaluate(received, site_plan(cfg), 0)
    assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0
    assert result.examples == 16


def _head_delta(update_delta: dict[str, torch.Tensor]) -> torch.Tensor:
    (key,) = [k for k in update_delta if "score" in k and k.endswith("weight")]
    return update_delta[key]


@pytest.mark.parametrize("loss", ["restricted", "calibrated"])
def test_skew_robust_loss_leaves_the_head_rows_of_absent_labels_alone(
    examples_dir: Path, loss: str
) -> None:
    cfg, site = _classification_site(examples_dir, f"train.classifier-loss='{loss}'")
    held = {e.label for e in site.data.train}
    absent = sorted(set(range(77)) - held)
    assert absent, "the Dirichlet split leaves this site without some labels"
    received = join_modules(site.host.initial)
    robust = _head_delta(site.train(received, site_plan(cfg), 1, 0).delta)
    plain_plan = site_plan(cfg).model_copy(
        update={"train": cfg.train.model_copy(update={"classifier_loss": "plain"})}
    )
    plain = _head_delta(site.train(received, plain_plan, 1, 0).delta)
    assert torch.all(robust[absent] == 0)  # no push on a label this site has never seen
    assert torch.all(plain[absent].abs().sum(dim=1) > 0)  # the plain loss pushes them all
    assert torch.all(robust[sorted(held)].abs().sum(dim=1) > 0)


def test_proximal_term_keeps_the_delta_near_the_global(cfg: RunConfig) -> None:
    site = _runtime(cfg)
    received = join_modules(site.host.initial)

    def norm(mu: float) -> float:
        # Plain SGD at lr x mu = 0.9: each step removes 90 % of the distance to the global.
        update = {"proximal_mu": mu, "optimizer": "sgd", "lr": 0.3, "momentum": 0.0}
        train = cfg.train.model_copy(update=update)
        plan = site_plan(cfg).model_copy(update={"train": train})
        delta = site.train(received, plan, server_round=1, version=0).delta
        return float(sum((d.double() ** 2).sum() for d in delta.values()) ** 0.5)

    free, held = norm(0.0), norm(3.0)
    assert 0 < held < 0.5 * free
