"""fedlora generate / predict: base + registry versions, refusing a foreign base."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.adapter_host import AdapterHost
from common.config import ModelConfig, ModuleConfig
from common.errors import FingerprintMismatch
from common.registry import Registry
from fedlora.inference import generate, load_with_adapters, predict

REPO = Path(__file__).resolve().parent.parent


def _publish(tmp_path: Path, task: str, labels: list[str] | None = None) -> Path:
    cfg = ModelConfig(name="tiny-llama", task=task)
    module = ModuleConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"])
    host = AdapterHost(cfg, {"shared": module}, len(labels) if labels else None)
    state = host.initial["shared"]
    torch.manual_seed(1)
    trained = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    manifest = {"base_fingerprint": host.base.fingerprint, "labels": labels}
    return (
        Registry(tmp_path / "registry")
        .publish("shared", trained, host.loras["shared"], manifest)
        .path
    )


def test_generate_with_a_registry_version(tmp_path: Path) -> None:
    folder = _publish(tmp_path, "causal-lm")
    text = generate("tiny-llama", [folder], "Say hello", max_new_tokens=5)
    assert isinstance(text, str)
    _, model, _ = load_with_adapters("tiny-llama", "causal-lm", [folder, folder])
    assert sorted(model.base_model.active_adapters) == ["adapter0", "adapter1"]


def test_predict_names_a_label(tmp_path: Path) -> None:
    folder = _publish(tmp_path, "classification", ["refund", "card", "other"])
    label, probability = predict("tiny-llama", [folder], "where is my card?")
    assert label in {"refund", "card", "other"} and 0 < probability <= 1


def test_foreign_base_is_refused(tmp_path: Path) -> None:
    folder = _publish(tmp_path, "causal-lm")
    with pytest.raises(FingerprintMismatch):
        load_with_adapters("tiny-llama", "causal-lm", [folder], seed=1)  # another base


def test_cli_generate(tmp_path: Path) -> None:
    folder = _publish(tmp_path, "causal-lm")
    result = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "generate", "--model", "tiny-llama",
         "--adapters", str(folder), "--prompt", "hi", "--max-new-tokens", "3"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
