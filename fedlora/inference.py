"""A quick look at what a federation produced: base model + one or more adapter versions.

    fedlora generate --model M --adapters DIR [DIR ...] --prompt TEXT   (causal LM)
    fedlora predict  --model M --adapters DIR [DIR ...] --text TEXT     (classification)

Each adapter folder is a registry version (PEFT files + manifest.json) or an exported copy;
an adapter whose manifest names another base fingerprint is refused before it is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open

from common.config import ModelConfig
from common.errors import FingerprintMismatch, ModelError
from common.models import LoadedBase, load_base
from common.registry_format import ADAPTER_FILE, MANIFEST_FILE
from common.tokens import prompt_text


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _head_size(folder: Path) -> int | None:
    """Rows of a saved classification head (``modules_to_save``), i.e. the number of labels."""
    with safe_open(str(folder / ADAPTER_FILE), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            if ("score" in key or "classifier" in key) and key.endswith("weight"):
                return int(handle.get_slice(key).get_shape()[0])
    return None


def load_with_adapters(
    model: str, task: str, adapters: list[Path], seed: int = 0
) -> tuple[LoadedBase, PeftModel, list[dict[str, Any]]]:
    """The base with every adapter loaded and active; refuses a foreign base fingerprint."""
    for folder in adapters:
        if not (folder / ADAPTER_FILE).is_file():
            raise ModelError(f"{folder}: no {ADAPTER_FILE}; expected a registry version folder")
    labels = _head_size(adapters[0]) if task == "classification" else None
    cfg = ModelConfig.model_validate({"name": model, "task": task, "seed": seed})
    base = load_base(cfg, num_labels=labels)
    manifests = [_manifest(folder) for folder in adapters]
    for folder, manifest in zip(adapters, manifests, strict=True):
        expected = manifest.get("base_fingerprint")
        if expected is not None and expected != base.fingerprint:
            raise FingerprintMismatch(str(expected), base.fingerprint, where=str(folder))
    names = [f"adapter{index}" for index in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(base.model, str(adapters[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(str(folder), adapter_name=name)
    peft_model.base_model.set_adapter(names)  # type: ignore[operator]  # all active: outputs add
    peft_model.eval()
    return base, peft_model, manifests


@torch.no_grad()
def generate(model: str, adapters: list[Path], prompt: str, max_new_tokens: int = 64) -> str:
    base, peft_model, _ = load_with_adapters(model, "causal-lm", adapters)
    tokenizer = base.tokenizer
    encoded = tokenizer(prompt_text(tokenizer, prompt), return_tensors="pt")
    encoded = {k: v.to(base.placement.device) for k, v in encoded.items()}
    output = peft_model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[0, encoded["input_ids"].shape[1] :]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True))


@torch.no_grad()
def predict(model: str, adapters: list[Path], text: str, seed: int = 0) -> tuple[str, float]:
    """The most likely label (its name when the manifest lists them) and its probability."""
    base, peft_model, manifests = load_with_adapters(model, "classification", adapters, seed)
    encoded = base.tokenizer(text, return_tensors="pt", truncation=True)
    encoded = {k: v.to(base.placement.device) for k, v in encoded.items()}
    probs = torch.softmax(peft_model(**encoded).logits.float()[0], dim=-1)
    index = int(probs.argmax())
    names = manifests[0].get("labels")
    label = str(names[index]) if isinstance(names, list) and index < len(names) else str(index)
    return label, float(probs[index])
