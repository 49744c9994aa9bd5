"""Examples to token tensors, and token tensors to padded batches.

One encoded example is a dict of 1-D long tensors ``input_ids``, ``attention_mask`` and
``labels``: token labels for causal LM (``-100`` where no loss is taken: prompt tokens and
padding), or a 0-dim label id for classification. Padding happens per batch in ``collate``, so
an encoded example is only as long as its own tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from common.errors import DataError

if TYPE_CHECKING:
    from common.data import Example, Kind

# Label value the loss ignores (torch.nn.CrossEntropyLoss's default ignore_index).
IGNORE_INDEX = -100
# Prompt format for tokenizers without a chat template (Alpaca style).
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"

Encoded = dict[str, torch.Tensor]


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer: Any, instruction: str) -> str:
    """The prompt for one instruction: the tokenizer's chat template, else ``PLAIN_PROMPT``.

    Training and generation must use the same prompt, so both call this.
    """
    if _has_chat_template(tokenizer):
        messages = [{"role": "user", "content": instruction}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return str(prompt)
    return PLAIN_PROMPT.format(instruction=instruction)


def prompt_ids(tokenizer: Any, instruction: str) -> list[int]:
    """Token ids of the prompt; a chat template already holds its special tokens (BOS...)."""
    text = prompt_text(tokenizer, instruction)
    encoded = tokenizer(text, add_special_tokens=not _has_chat_template(tokenizer))
    return list(encoded["input_ids"])


def fit_prompt_response(
    prompt: list[int], response: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Truncate prompt + response to ``max_length`` tokens, keeping response tokens to learn.

    The response is cut from the right while the whole prompt fits; a prompt that fills the
    window alone is cut from the left (its end, where the answer starts, matters most), keeping
    up to half the window for the response.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    if len(prompt) < max_length:
        return prompt, response[: max_length - len(prompt)]
    keep = min(len(response), max(1, max_length // 2))
    return prompt[len(prompt) - (max_length - keep) :], response[:keep]


def _encode_instruction(example: Example, tokenizer: Any, max_length: int) -> Encoded:
    if example.response is None:
        raise DataError(f"instruction example without a response: {example.text[:80]!r}")
    # Prompt and response are tokenized separately, so the boundary is exact: the loss mask
    # covers the prompt tokens and nothing else, whatever the tokenizer merges.
    response = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response.append(int(tokenizer.eos_token_id))
    prompt, response = fit_prompt_response(
        prompt_ids(tokenizer, example.text), response, max_length
    )
    ids = torch.tensor(prompt + response, dtype=torch.long)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt) + response, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _encode_tokens(example: Example, tokenizer: Any, max_length: int) -> torch.Tensor:
    encoded = tokenizer(example.text, truncation=True, max_length=max_length)
    ids = torch.tensor(list(encoded["input_ids"]), dtype=torch.long)
    if ids.numel() == 0:
        raise DataError(f"example has no tokens: {example.text[:80]!r}")
    return ids


def encode_examples(
    examples: list[Example], kind: Kind, tokenizer: Any, max_length: int
) -> list[Encoded]:
    """Token tensors for each example (``tokenizer``: a transformers tokenizer).

    instruction: loss on the response (and EOS) only; text: loss on every token;
    classification: ``labels`` is the 0-dim label id. At most ``max_length`` tokens each.
    """
    items: list[Encoded] = []
    for example in examples:
        if kind == "instruction":
            items.append(_encode_instruction(example, tokenizer, max_length))
            continue
        ids = _encode_tokens(example, tokenizer, max_length)
        if kind == "text":
            labels = ids.clone()
        elif example.label is None:
            raise DataError(f"classification example without a label: {example.text[:80]!r}")
        else:
            labels = torch.tensor(example.label, dtype=torch.long)
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return items


def collate(items: list[Encoded], pad_token_id: int) -> Encoded:
    """Right-pad a batch: ``pad_token_id`` in ids, 0 in the mask, ``-100`` in token labels."""
    if not items:
        raise ValueError("collate needs at least one item")
    token_labels = items[0]["labels"].dim() == 1
    if any((item["labels"].dim() == 1) != token_labels for item in items):
        raise ValueError("collate: a batch mixes token labels and class labels")
    length = max(int(item["input_ids"].numel()) for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    if token_labels:
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    else:
        labels = torch.stack([item["labels"] for item in items])
    for row, item in enumerate(items):
        n = int(item["input_ids"].numel())
        input_ids[row, :n] = item["input_ids"]
        attention_mask[row, :n] = item["attention_mask"]
        if token_labels:
            labels[row, :n] = item["labels"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iterate_batches(
    items: list[Encoded], batch_size: int, seed: int, pad_token_id: int
) -> Iterator[Encoded]:
    """Endless training batches, reshuffled every epoch by a generator seeded with ``seed``.

    Every batch has ``min(batch_size, len(items))`` examples, so a tiny site still trains; the
    incomplete remainder of an epoch is skipped and the next epoch reshuffles.
    """
    if not items:
        raise DataError("no examples to train on; the site's training split is empty")
    size = min(batch_size, len(items))
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order) - size + 1, size):
            yield collate([items[i] for i in order[start : start + size]], pad_token_id)


def eval_batches(items: list[Encoded], batch_size: int, pad_token_id: int) -> Iterator[Encoded]:
    """One pass over ``items`` in order, in batches of at most ``batch_size``."""
    for start in range(0, len(items), batch_size):
        yield collate(items[start : start + batch_size], pad_token_id)
