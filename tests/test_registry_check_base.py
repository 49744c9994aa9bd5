"""`fedlora registry check-base`: does a registered adapter fit a new base model?"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from common.config import ModelConfig
from common.models import load_base
from common.registry import Registry
from fedlora.registry_cli import main
from server.base_fit import check_base

MODEL_SECTION = {"name": "tiny-llama", "task": "causal-lm", "device": "cpu", "seed": 0}


def _publish_run(run: Path) -> str:
    """A run folder whose registry holds tiny-llama (seed 0) adapters: shared v0..v1, mlp v0."""
    base = load_base(ModelConfig(name="tiny-llama", device="cpu"))
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    mlp = LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj"], task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(base.model, config, adapter_name="shared")
        model.add_adapter("mlp", mlp)
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": MODEL_SECTION}), encoding="utf-8")
    registry = Registry(run / "registry")
    manifest = {"base_fingerprint": base.fingerprint}
    for name in ("shared", "shared", "mlp"):
        state = get_peft_model_state_dict(model, adapter_name=name)
        registry.publish(name, state, model.peft_config[name], manifest)
    return base.fingerprint


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("check-base") / "run"
    return folder, _publish_run(folder)


def _save_base(folder: Path, model: transformers.PreTrainedModel) -> Path:
    """A local transformers folder with tiny-llama's tokenizer: a base `--model` can name."""
    model.save_pretrained(folder)
    load_base(ModelConfig(name="tiny-llama", device="cpu")).tokenizer.save_pretrained(folder)
    return folder


def _llama(**sizes: int) -> transformers.PreTrainedModel:
    tiny = load_base(ModelConfig(name="tiny-llama", device="cpu")).model.config.to_dict()
    config = transformers.LlamaConfig.from_dict({**tiny, **sizes})
    return transformers.LlamaForCausalLM(config)


def _check(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, list[str]]:
    code = main(["check-base", *map(str, args)])
    return code, capsys.readouterr().out.splitlines()


def test_another_seed_is_a_new_base_that_fits(
    run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, old = run
    new = load_base(ModelConfig(name="tiny-llama", device="cpu", seed=1)).fingerprint
    assert new != old
    code, lines = _check(capsys, folder, "--model", "tiny-llama", "--set", "model.seed=1")
    assert code == 0, lines
    modules = [line for line in lines if line.startswith(("mlp/", "shared/"))]
    assert [line.split(":")[0] for line in modules] == ["mlp/v0000", "shared/v0001"]
    for line in modules:
        # Both fingerprints, in full, and the verdict.
        assert "fits" in line and old in line and new in line and "a different base" in line
    assert not any(line.startswith("misfit") for line in lines)
    # The registry folder itself works as well as the run folder around it.
    code, lines = _check(capsys, folder / "registry", "--model", "tiny-llama")
    assert code == 0 and all("the same base" in line for line in lines[:2]), lines


def test_a_base_without_the_target_modules_is_a_misfit(
    run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = run
    gpt2 = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    other = _save_base(tmp_path / "gpt2", transformers.GPT2LMHeadModel(gpt2))
    code, lines = _check(capsys, folder, "--model", other)
    assert code == 1
    misfits = [line for line in lines if line.startswith("misfit: ")]
    assert "misfit: mlp/v0000: target module 'gate_proj' does not exist in the new base" in misfits
    for target in ("q_proj", "v_proj"):
        expected = f"misfit: shared/v0001: target module '{target}' does not exist in the new base"
        assert expected in misfits
    assert any("does NOT fit" in line for line in lines)


def test_other_shapes_and_more_layers_are_misfits(
    run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = run
    wider = _save_base(tmp_path / "wider", _llama(hidden_size=32))
    code, lines = _check(capsys, folder, "--model", wider)
    assert code == 1
    shape = [line for line in lines if "q_proj.lora_A.weight: shape (4, 64)" in line]
    assert shape and "needs (4, 32)" in shape[0]
    deeper = _save_base(tmp_path / "deeper", _llama(num_hidden_layers=3))
    code, lines = _check(capsys, folder, "--model", deeper)
    assert code == 1
    assert any("holds no factors for: model.layers.2.mlp.gate_proj" in line for line in lines)


def test_check_base_is_one_list_per_module(run: tuple[Path, str]) -> None:
    folder, old = run
    base = load_base(ModelConfig(name="tiny-llama", device="cpu"))
    fits = check_base(Registry(folder / "registry"), base.model, base.fingerprint)
    assert [(f.module, f.version, f.fits, f.same_base) for f in fits] == [
        ("mlp", 0, True, True),
        ("shared", 1, True, True),
    ]
    assert fits[1].targets == ["q_proj", "v_proj"] and fits[1].recorded_fingerprint == old


def test_bad_input_is_one_error(
    run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = run
    code, lines = _check(capsys, folder, "--model", "tiny-llama", "--set", "train.lr=1")
    assert code == 2 and lines == [
        "error: --set 'train.lr=1': check-base takes model.KEY=VALUE only"
    ]
    code, lines = _check(capsys, tmp_path, "--model", "tiny-llama")
    assert code == 2 and "holds no fedlora registry" in lines[0] and len(lines) == 1
    code, lines = _check(capsys, folder, "--model", str(tmp_path / "nope"))
    assert code == 2 and "no such folder" in lines[0]


def test_a_classification_head_is_checked_too(tmp_path: Path) -> None:
    """A saved head (modules_to_save) fits a base with as many classes, not one with more."""
    cfg = ModelConfig(name="tiny-llama", task="classification", device="cpu")
    base = load_base(cfg, num_labels=4)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="SEQ_CLS")
    model = get_peft_model(base.model, config, adapter_name="shared")
    registry = Registry(tmp_path / "registry")
    state = get_peft_model_state_dict(model, adapter_name="shared")
    assert any(not key.count("lora_") for key in state)  # the head travels with the adapter
    registry.publish("shared", state, model.peft_config["shared"], {})
    same = load_base(cfg, num_labels=4)
    (fit,) = check_base(registry, same.model, same.fingerprint)
    assert fit.fits and fit.recorded_fingerprint is None and not fit.same_base
    wider = load_base(cfg, num_labels=5)
    (fit,) = check_base(registry, wider.model, wider.fingerprint)
    assert fit.misfits == [
        "base_model.model.score.weight: shape (4, 64), the new base's is (5, 64)"
    ]
