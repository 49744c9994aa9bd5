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
from safetensors.torch import save_file

from common.errors import ModelError
from common.fingerprint import fingerprint, fingerprint_checkpoint

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
