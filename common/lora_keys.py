"""Which tensors of a peft LoRA state are factors: ``lora_A`` / ``lora_B`` keys and their pairs.

Keys follow peft's saved names (``get_peft_model_state_dict``): ``<prefix>.lora_A.weight``
(r, k) and ``<prefix>.lora_B.weight`` (d, r), or ``<prefix>.lora_embedding_A`` /
``lora_embedding_B`` for embeddings; every other key (a ``modules_to_save`` head, a DoRA
magnitude) is a plain tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from common.adapters import _quote  # bounded key names: a hostile key may be megabytes
from common.errors import UpdateRejected

# ``...lora_A.weight`` (Linear, Conv) or ``...lora_embedding_A`` (Embedding, a bare Parameter).
_LORA_FACTOR = re.compile(r"(?:^|\.)lora_(?:embedding_)?([AB])(?:\.weight)?$")


def lora_factor(key: str) -> str | None:
    """Which LoRA factor ``key`` names: ``"A"``, ``"B"``, or ``None`` for any other tensor."""
    match = _LORA_FACTOR.search(key)
    return match.group(1) if match else None


def lora_pairs(keys: Iterable[str]) -> list[tuple[str, str]]:
    """Pair every ``lora_A`` key with its ``lora_B`` key, in the order the A keys appear.

    Raises
    ------
    UpdateRejected
        If an A key has no B key or a B key has no A key (naming it).
    """
    names = list(keys)
    present = set(names)
    pairs: list[tuple[str, str]] = []
    for key in names:
        match = _LORA_FACTOR.search(key)
        if match and match.group(1) == "A":
            pairs.append((key, key[: match.start(1)] + "B" + key[match.end(1) :]))
    partners = {b_key for _, b_key in pairs}
    for a_key, b_key in pairs:
        if b_key not in present:
            raise UpdateRejected(f"LoRA factor {_quote(a_key)} has no matching {_quote(b_key)}")
    for key in names:
        if lora_factor(key) == "B" and key not in partners:
            raise UpdateRejected(f"LoRA factor {_quote(key)} has no matching lora_A factor")
    return pairs
