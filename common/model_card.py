"""The model card (``README.md``) of an adapter version: what a reader or the Hugging Face hub
needs to use it, and nothing about the sites beyond how many there were.

The card is written from the version's manifest (base model, fingerprint, rule, round, cohort
size, privacy, licences) and, when the run's ``metrics.jsonl`` is at hand, that round's global
metrics. Its YAML header is huggingface_hub's ``ModelCardData``: ``library_name: peft``, the
base model's hub id (an alias maps to the repository its weights come from) and a licence,
so the folder can be uploaded as it is. Site ids, label lists and per-site numbers never
appear in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.model_names import ALIASES, card_base_model, portable_model_name

CARD_FILE = "README.md"
# Global metrics a card reports, in this order, with their labels.
_METRICS = (
    ("train_loss", "train loss (mean over sites)"),
    ("eval_loss", "evaluation loss"),
    ("eval_perplexity", "evaluation perplexity"),
    ("eval_accuracy", "evaluation accuracy"),
    ("epsilon", "DP epsilon spent"),
)
# The transformers class that loads the base for an adapter's peft task type.
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
}


def round_metrics(run_dir: Path, version: int) -> dict[str, float]:
    """The global metrics of the round that published ``version``, from ``metrics.jsonl``
    (empty when the file or the line is missing, e.g. at a site or for version 0)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    found: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line; the card is a summary, not the record
        if isinstance(record, dict) and record.get("version") == version:
            found = {
                key: float(record[key])
                for key, _ in _METRICS
                if isinstance(record.get(key), int | float)
            }
    return found


def _cell(value: Any) -> str:
    return "n/a" if value is None or value == "" else str(value).replace("|", "\\|")


def _base_line(manifest: dict[str, Any]) -> str:
    name = manifest.get("base_model")
    portable = portable_model_name(str(name)) if name else None
    if portable is None:
        return "a local model folder (no portable name; match it by fingerprint)"
    if portable in ALIASES:
        source = card_base_model(portable)
        return f"`{portable}` (fedlora alias" + (f" for `{source}`)" if source else ")")
    return f"`{portable}`"


def _privacy_line(manifest: dict[str, Any]) -> str:
    privacy = _cell(manifest.get("privacy"))
    dp = manifest.get("dp")
    if isinstance(dp, dict):
        privacy += f", DP clip {dp.get('clip')}, noise multiplier {dp.get('noise_multiplier')}"
    return privacy


def _facts(manifest: dict[str, Any], metrics: dict[str, float]) -> list[tuple[str, str]]:
    cohort = manifest.get("cohort")
    rows = [
        ("base model", _base_line(manifest)),
        ("base fingerprint (SHA-256)", f"`{_cell(manifest.get('base_fingerprint'))}`"),
        ("module", f"`{manifest.get('module')}` (scope {_cell(manifest.get('scope'))})"),
        ("version", f"{manifest.get('version')} (parent {_cell(manifest.get('parent'))})"),
        ("aggregation rule", _cell(manifest.get("rule"))),
        ("federated rounds", _cell(manifest.get("round"))),
        ("sites in the round", _cell(len(cohort) if isinstance(cohort, list) else None)),
        ("privacy", _privacy_line(manifest)),
        ("base model licence", _cell(manifest.get("base_license"))),
        ("data licence", _cell(manifest.get("data_license"))),
    ]
    rows += [(label, f"{metrics[key]:.4f}") for key, label in _METRICS if key in metrics]
    return rows


def model_card(
    manifest: dict[str, Any],
    metrics: dict[str, float] | None = None,
    task_type: str | None = None,
    title: str | None = None,
) -> str:
    """The ``README.md`` text of one adapter version (YAML header + Markdown).

    ``task_type`` is the adapter config's (``CAUSAL_LM``, ``SEQ_CLS``), for the loading
    example; ``title`` replaces ``<module> v<NNNN>`` (a merged export).
    """
    from huggingface_hub import ModelCardData  # only where a card is written

    name = manifest.get("base_model")
    portable = portable_model_name(str(name)) if name else None
    data = ModelCardData(
        base_model=card_base_model(portable),
        library_name="peft",
        license=manifest.get("base_license") or None,
        tags=["fedlora", "lora", "peft", "federated-learning"],
    )
    title = title or f"{manifest.get('module')} v{int(manifest.get('version') or 0):04d}"
    table = "\n".join(f"| {key} | {value} |" for key, value in _facts(manifest, metrics or {}))
    load_name = card_base_model(portable) or portable or "<the base model folder>"
    auto = _AUTO_CLASSES.get(task_type or "", "AutoModel")
    return f"""---
{data.to_yaml()}
---

# {title}: a LoRA adapter trained with fedlora

A LoRA adapter (PEFT format) trained by federated learning: each site trained on its own data
and sent only its update; no data left a site. This card states how many sites took part, never
who they were or what data they hold.

| | |
|---|---|
{table}

Load it on the same base (check the fingerprint with `fedlora fingerprint`):

```python
from peft import PeftModel
from transformers import {auto}

base = {auto}.from_pretrained("{load_name}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
```

`manifest.json` records the lineage and the SHA-256 of every file; `fedlora registry verify`
checks them.
"""
