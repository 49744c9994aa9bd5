"""The base model's identity: a SHA-256 over class, config, weights, tokenizer and extras.

Every site and the coordinator must hold the same base; this digest proves it. It is computed on
the weights as they come from the source (source dtype, CPU) before any cast or move, so a CUDA
bf16 site and a CPU fp32 coordinator agree. A 4-bit base is fingerprinted from its unquantized
checkpoint files (``fingerprint_checkpoint``), which gives the same digest as ``fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.errors import ModelError

# Config keys that say how a model was loaded, saved or is run, not which model it is
# (the class name is hashed separately; keys starting with "_" are dropped as well).
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "torch_dtype", "dtype", "use_cache", "architectures",
     "quantization_config", "output_attentions", "output_hidden_states", "return_dict"}
)  # fmt: skip
# Tokenizer JSON keys that calling the tokenizer with padding/truncation rewrites.
_VOLATILE_TOKENIZER_KEYS = ("padding", "truncation")
# What determines the 4-bit weights; not the compute dtype, which depends on the GPU.
QUANT_4BIT_EXTRA = {"quantize": "bitsandbytes-4bit", "quant-type": "nf4"}


def _update(digest: Any, label: str, payload: bytes | memoryview) -> None:
    """Feed one length-prefixed field, so that no two field sequences hash the same."""
    digest.update(f"{label}:{len(payload)}:".encode())
    digest.update(payload)


def _canonical(value: Any) -> Any:
    """Drop volatile and private (``_``-prefixed) config keys, recursively."""
    if isinstance(value, dict):
        return {
            k: _canonical(v)
            for k, v in value.items()
            if k not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_")
        }
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _hash_header(digest: Any, model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    config_dict = _canonical(config.to_dict()) if config is not None else {}
    _update(digest, "class", type(model).__name__.encode())
    _update(digest, "config", json.dumps(config_dict, sort_keys=True, default=str).encode())


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    _update(digest, "tensor", f"{name}|{tensor.dtype}|{list(tensor.shape)}".encode())
    _update(digest, "bytes", data.data)


def _hash_tail(
    digest: Any, tokenizer: PreTrainedTokenizerBase | None, extra: dict[str, str] | None
) -> None:
    """Hash the tokenizer (rules and vocabulary, special tokens, chat template), then ``extra``."""
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            rules: Any = json.loads(backend.to_str())
            for key in _VOLATILE_TOKENIZER_KEYS:
                rules.pop(key, None)
        else:
            rules = sorted(tokenizer.get_vocab().items())
        part = [rules, tokenizer.special_tokens_map, tokenizer.chat_template]
        _update(digest, "tokenizer", json.dumps(part, sort_keys=True, default=str).encode())
    if extra is not None:
        _update(digest, "extra", json.dumps(extra, sort_keys=True).encode())


def _base_key(key: str) -> str | None:
    """The base-model name of a state-dict key, or None for an adapter tensor (peft)."""
    if "lora_" in key or "modules_to_save" in key:
        return None
    key = key.removeprefix("base_model.model.")
    return key.replace(".base_layer", "").replace(".original_module", "")


def fingerprint(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    extra: dict[str, str] | None = None,
) -> str:
    """SHA-256 (hex) identifying a base model: class, config, weights, tokenizer, ``extra``.

    Adapter tensors (peft ``lora_*``, ``modules_to_save``) are left out and peft's renaming
    (``base_layer``, ``original_module``) undone, so a model's fingerprint stays the same after
    LoRA is injected and trained. Dtypes are part of it: fingerprint before casting.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model, a ``PeftModel`` or its ``get_base_model()``.
    tokenizer : PreTrainedTokenizerBase or None
        The tokenizer that belongs to the model; None leaves it out.
    extra : dict of str to str, optional
        Further identity, e.g. the quantization settings; hashed last.

    Returns
    -------
    str
        64 hex digits.
    """
    get_base_model = getattr(model, "get_base_model", None)  # a peft wrapper
    base = get_base_model() if callable(get_base_model) else model
    digest = hashlib.sha256()
    _hash_header(digest, base)
    state = base.state_dict()
    names = {name: key for key in state if (name := _base_key(key)) is not None}
    for name in sorted(names):
        _hash_tensor(digest, name, state[names[name]])
    _hash_tail(digest, tokenizer, extra)
    return digest.hexdigest()


def fingerprint_checkpoint(
    folder: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    extra: dict[str, str] | None,
) -> str:
    """``fingerprint`` of the unquantized weights, read from the safetensors files of ``folder``.

    ``model`` (quantized) gives the class and config. Its tensors missing from the files but
    sharing memory with one that is there (tied embeddings) are hashed under their own name too,
    as ``fingerprint`` sees them in a loaded model.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors files to fingerprint the 4-bit base from")
    state = model.state_dict()
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        where = {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118
        unknown = sorted(set(where) - set(state))
        if unknown:
            raise ModelError(f"{folder}: checkpoint names {unknown[:3]} are not the model's")
        pointers = {state[key].data_ptr(): key for key in where}
        source = {key: key for key in where}
        for key, tensor in state.items():
            if key not in where and tensor.data_ptr() in pointers:
                source[key] = pointers[tensor.data_ptr()]
        digest = hashlib.sha256()
        _hash_header(digest, model)
        for name in sorted(source):
            _hash_tensor(digest, name, where[source[name]].get_tensor(source[name]))
    _hash_tail(digest, tokenizer, extra)
    return digest.hexdigest()
