"""The ``centralized-full`` arm of ``fedlora compare``: every parameter trained, or a clear skip."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from common.config import load_config
from common.models import load_base
from fedlora import compare_full
from fedlora.compare_cli import add_compare_parser
from fedlora.compare_full import (
    BYTES_PER_PARAMETER,
    NAME,
    base_parameter_count,
    centralized_full,
    full_training_bytes,
)
from fedlora.comparison import Comparison

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"
SHORT = ["federation.rounds=1", "train.local-steps=1"]


def _classification_config(folder: Path) -> Path:
    """A tiny-llama sequence classifier on 4 labels, 48 rows, 2 sites."""
    with (folder / "train.csv").open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        for i in range(48):
            label = "abcd"[i % 4]
            writer.writerow([f"my card {label * 3} please {i}", f"intent-{label}"])
    (folder / "run.toml").write_text(
        '[model]\nname = "tiny-llama"\ntask = "classification"\ndevice = "cpu"\n'
        '[data]\npath = "train.csv"\nformat = "classification"\nholdout = 0.2\n'
        "[federation]\nsites = 2\nrounds = 1\n"
        "[train]\nlocal-steps = 1\nbatch-size = 4\nmax-length = 32\nlr = 1e-2\n"
        '[modules.shared]\nrank = 2\nalpha = 4\ntargets = ["q_proj", "v_proj"]\n',
        encoding="utf-8",
    )
    return folder / "run.toml"


def _capture_trained(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.nn.Module, Any]]:
    """Record the model and train settings the arm hands to ``train_local``."""
    seen: list[tuple[torch.nn.Module, Any]] = []
    real = compare_full.train_local

    def recording(model: torch.nn.Module, batches: Any, cfg: Any, *args: Any) -> Any:
        seen.append((model, cfg))
        return real(model, batches, cfg, *args)

    monkeypatch.setattr(compare_full, "train_local", recording)
    return seen


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_full_arm_trains_every_parameter(
    task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = TINY if task == "causal-lm" else _classification_config(tmp_path)
    cfg = load_config(path, SHORT)
    comparison = Comparison(cfg)
    seen = _capture_trained(monkeypatch)
    result = centralized_full(comparison)
    assert result.arm is not None and result.skipped is None
    labels = comparison.dataset.label_names
    fresh = load_base(cfg.model, num_labels=len(labels) if labels else None).model
    numel = sum(p.numel() for p in fresh.parameters())
    # Every parameter, the classification head included, and nothing of LoRA.
    assert result.arm.trainable_parameters == numel
    assert numel == base_parameter_count(comparison.host.base.model)
    if task == "classification":
        assert any(name.startswith("score.") for name, _ in fresh.named_parameters())
    # Every tensor moved away from the base: the arm really trained all of them.
    (model,) = {m for m, _ in seen}
    assert {cfg.lr for _, cfg in seen} == {comparison.plain.train.lr}  # centralized's settings
    trained = dict(model.named_parameters())
    assert sorted(trained) == sorted(name for name, _ in fresh.named_parameters())
    unchanged = [n for n, p in fresh.named_parameters() if torch.equal(p, trained[n].detach())]
    assert unchanged == []
    details = result.details
    assert details["full_federation_bytes_per_round_per_site"] == 2 * 4 * numel
    assert details["steps"] == 1 * len(comparison.sites)  # centralized's examples budget
    assert details["seconds_per_step"] > 0
    assert result.arm.peak_rss_bytes is not None and result.arm.peak_rss_bytes > 0
    assert [p.round for p in result.curve] == [1]


def test_full_arm_takes_its_own_learning_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    comparison = Comparison(load_config(TINY, SHORT))
    seen = _capture_trained(monkeypatch)
    result = centralized_full(comparison, lr=5e-5)
    assert {cfg.lr for _, cfg in seen} == {5e-5} and result.details["lr"] == 5e-5
    assert {cfg.local_steps for _, cfg in seen} == {len(comparison.sites)}  # 1 step x 3 sites
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers())
    args = parser.parse_args(["compare", str(TINY), "--out", "x", "--full-lr", "5e-5"])
    assert args.full_lr == 5e-5
    for bad in ("0", "-1", "inf", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["compare", str(TINY), "--out", "x", "--full-lr", bad])


def test_full_arm_refuses_where_it_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    comparison = Comparison(load_config(TINY, SHORT))
    monkeypatch.setattr(compare_full, "available_memory_bytes", lambda device: 1024)

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a skipped arm must not load or train a model")

    monkeypatch.setattr(compare_full, "load_base", must_not_load)
    monkeypatch.setattr(compare_full, "train_local", must_not_load)
    result = centralized_full(comparison)
    assert result.arm is None and result.curve == []
    assert result.skipped is not None
    assert "would not fit" in result.skipped and "0.00 GiB available" in result.skipped
    assert result.details["available_bytes"] == 1024
    assert result.details["estimated_bytes"] > 1024
    row = compare_full.skipped_row(result, 8)
    assert row.startswith(f"| {NAME} | skipped: would not fit") and row.count("|") == 9


def test_quantized_base_is_refused_not_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    comparison = Comparison(load_config(TINY, SHORT))
    # A 4-bit base only loads on CUDA; the arm's check needs only the config's word for it.
    quantized = comparison.cfg.model.model_copy(update={"quantize": "4bit"})
    comparison.cfg = comparison.cfg.model_copy(update={"model": quantized})
    monkeypatch.setattr(compare_full, "load_base", lambda *a, **k: pytest.fail("loaded"))
    result = centralized_full(comparison)
    assert result.arm is None and result.skipped is not None and "4bit" in result.skipped


def test_memory_estimate_counts_weights_gradients_moments_and_activations() -> None:
    config = type("Config", (), {"hidden_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "vocab_size": 100})()  # fmt: skip
    params = 1000
    # 1000 x 16 + 2 layers x 8 tokens x (68 x 64 + 10 x 4 x 4) + 8 x 100 x 4 x 3 bytes
    expected = params * BYTES_PER_PARAMETER + 2 * 8 * (68 * 64 + 10 * 4 * 4) + 8 * 100 * 12
    assert full_training_bytes(params, config, 2, 4, causal_lm=True) == expected
    no_logits = expected - 8 * 100 * 12
    assert full_training_bytes(params, config, 2, 4, causal_lm=False) == no_logits
