"""Fingerprint: a known answer, config lists, and the streamed checkpoint path's own checks.

The transformers-model cases (every element, tokenizer, LoRA injection) are in test_models.py;
these use a plain ``torch.nn.Linear`` with fixed weights, which has no config and no tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tokenizers import AddedToken

from common.errors import ModelError
from common.fingerprint import QUANT_4BIT_EXTRA, _base_key, fingerprint, fingerprint_checkpoint

# sha256 over the length-prefixed fields "class", "config", "tensor", "bytes" of _linear().
# Registries and sites compare stored fingerprints across versions: a change to what is hashed
# or how must be deliberate, and this digest changes with it.
FAST_DIGEST = "cbab5cf6a3909c329af2da8df7dd77ccf7341b3a304e57606be5d028b1e4c640"
SLOW_DIGEST = "6c304121e89bd2c5ab13016065761cae82b50de20d70fc6be8dd2ce1f2ef50aa"
LINEAR_DIGEST = "dc34618188b618ea7a1978c7c9f67f076b75b36de590b4b4c9215f6d2814ff25"


def _linear() -> torch.nn.Linear:
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(6.0).reshape(2, 3))
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    return layer


class _Configured(torch.nn.Linear):
    """A Linear with a transformers-like ``config`` whose dict holds a list."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(2, 2)
        torch.nn.init.zeros_(self.weight)
        torch.nn.init.zeros_(self.bias)
        self.config = SimpleNamespace(to_dict=lambda: config)


def test_fingerprint_of_a_fixed_model_is_a_known_answer() -> None:
    assert fingerprint(_linear(), None) == LINEAR_DIGEST


def _fast_tokenizer() -> SimpleNamespace:
    """Stands in for a fast tokenizer: rules from its backend, whose padding state is volatile."""
    rules = '{"model": {"vocab": {"a": 0, "b": 1}}, "padding": {"length": 8}}'  # no truncation
    backend = SimpleNamespace(to_str=lambda: rules)
    specials = {"pad_token": "b", "eos_token": "a"}  # keys out of order: hashed sorted
    return SimpleNamespace(
        backend_tokenizer=backend, special_tokens_map=specials, chat_template="t"
    )


def _slow_tokenizer(vocab: dict[str, int]) -> SimpleNamespace:
    """Stands in for a slow (Python) tokenizer: no backend, rules from its vocabulary."""
    specials = {"pad_token": "b", "eos_token": "a"}
    return SimpleNamespace(get_vocab=lambda: vocab, special_tokens_map=specials, chat_template=None)


@pytest.mark.parametrize(
    ("tokenizer", "digest"),
    [
        (_fast_tokenizer(), FAST_DIGEST),
        (_slow_tokenizer({"a": 0, "b": 1}), SLOW_DIGEST),
    ],
)
def test_fingerprint_with_tokenizer_and_extra_is_a_known_answer(
    tokenizer: SimpleNamespace, digest: str
) -> None:
    extra = {"quant-type": "nf4", "quantize": "bitsandbytes-4bit"}
    assert fingerprint(_linear(), tokenizer, extra) == digest  # type: ignore[arg-type]


def test_fingerprint_covers_a_slow_tokenizers_vocabulary() -> None:
    one = fingerprint(_linear(), _slow_tokenizer({"a": 0, "b": 1}))  # type: ignore[arg-type]
    other = fingerprint(_linear(), _slow_tokenizer({"a": 0, "c": 1}))  # type: ignore[arg-type]
    assert one != other


def test_fingerprint_covers_the_elements_of_lists_in_the_config() -> None:
    one = fingerprint(_Configured({"layer_types": ["full", "sliding"]}), None)
    other = fingerprint(_Configured({"layer_types": ["full", "full"]}), None)
    assert one != other


def test_fingerprint_does_not_depend_on_the_key_order_of_config_or_extra() -> None:
    """Two loads may build the config (or a caller the extra) in another order: same base."""
    one = fingerprint(_Configured({"hidden": 4, "layers": 2}), None, QUANT_4BIT_EXTRA)
    other = fingerprint(
        _Configured({"layers": 2, "hidden": 4}), None, dict(reversed(QUANT_4BIT_EXTRA.items()))
    )
    assert one == other


def test_config_and_tokenizer_values_json_cannot_encode_are_hashed_by_their_text() -> None:
    """A config value or special token that is an object (a dtype, an ``AddedToken``) is
    hashed as its ``str``, not refused: and a different value still gives another digest."""
    half, brain = _Configured({"init": torch.float16}), _Configured({"init": torch.bfloat16})
    assert fingerprint(half, None) != fingerprint(brain, None)
    tokenizer, other = _slow_tokenizer({"a": 0}), _slow_tokenizer({"a": 0})
    tokenizer.special_tokens_map = {"pad_token": AddedToken("<pad>", special=True)}
    other.special_tokens_map = {"pad_token": AddedToken("<eos>", special=True)}
    assert fingerprint(half, tokenizer) != fingerprint(half, other)  # type: ignore[arg-type]


def test_every_name_in_a_peft_state_dict_maps_to_the_base_models_name() -> None:
    """peft prefixes ``base_model.model.`` and renames wrapped layers (``base_layer``,
    ``original_module``); its adapter tensors (``lora_*``, ``modules_to_save``) map to None."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.head = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)

    config = LoraConfig(r=1, target_modules=["proj"], modules_to_save=["head"])
    peft_names = list(get_peft_model(Tiny(), config).state_dict())
    mapped = {key: _base_key(key) for key in peft_names}
    assert {name for name in mapped.values() if name is not None} == set(Tiny().state_dict())
    assert [key for key, name in mapped.items() if name is None] == [
        key for key in peft_names if "lora_" in key or "modules_to_save" in key
    ]


def test_streamed_checkpoint_fingerprint_hashes_extra(tmp_path: Path) -> None:
    layer = _linear()
    save_file(
        {k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "m.safetensors"
    )
    extra = {"quantize": "bitsandbytes-4bit", "quant-type": "nf4"}
    streamed = fingerprint_checkpoint(tmp_path, layer, None, extra)  # type: ignore[arg-type]
    assert streamed == fingerprint(layer, None, extra) != fingerprint(layer, None)


def test_streamed_checkpoint_without_weights_or_with_foreign_names_is_refused(
    tmp_path: Path,
) -> None:
    layer = _linear()
    with pytest.raises(ModelError, match=r"no \*\.safetensors files to fingerprint"):
        fingerprint_checkpoint(tmp_path, layer, None, None)  # type: ignore[arg-type]
    tensors = {"weight": layer.weight.detach().clone(), "foreign.weight": torch.zeros(1)}
    save_file(tensors, tmp_path / "m.safetensors")
    with pytest.raises(ModelError, match=r"checkpoint names \['foreign\.weight'\] are not"):
        fingerprint_checkpoint(tmp_path, layer, None, None)  # type: ignore[arg-type]
    # The refusal quotes at most three names, whatever the file holds.
    tensors |= {name: torch.zeros(1) for name in ("x.a", "x.b", "x.c")}
    save_file(tensors, tmp_path / "m.safetensors")
    with pytest.raises(ModelError, match=r"names \['foreign\.weight', 'x\.a', 'x\.b'\] are not"):
        fingerprint_checkpoint(tmp_path, layer, None, None)  # type: ignore[arg-type]


def test_streamed_checkpoint_leaves_out_model_tensors_the_files_lack(tmp_path: Path) -> None:
    """A 4-bit model holds quantization state (``absmax`` and the like) that the unquantized
    checkpoint has not and that shares no memory with a checkpoint tensor: not hashed."""
    layer = _linear()
    save_file(
        {k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "m.safetensors"
    )
    layer.register_buffer("weight_absmax", torch.ones(2))
    streamed = fingerprint_checkpoint(tmp_path, layer, None, None)  # type: ignore[arg-type]
    assert streamed == LINEAR_DIGEST
