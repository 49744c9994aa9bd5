"""Tests for common.tokens: loss masks, truncation, padding and batch order.

The tokenizer is built here, offline: byte-level BPE with no merges (one token per byte) and two
special tokens, with and without a chat template.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from common.data import Example
from common.errors import DataError
from common.tokens import (
    IGNORE_INDEX,
    PLAIN_PROMPT,
    collate,
    encode_examples,
    eval_batches,
    fit_prompt_response,
    iterate_batches,
    prompt_ids,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def plain() -> PreTrainedTokenizerFast:
    return _byte_tokenizer()


@pytest.fixture
def chat() -> PreTrainedTokenizerFast:
    return _byte_tokenizer(CHAT_TEMPLATE)


@pytest.mark.parametrize("templated", [False, True])
def test_instruction_loss_only_on_response_tokens(templated: bool) -> None:
    tokenizer = _byte_tokenizer(CHAT_TEMPLATE if templated else None)
    example = Example(text="Name a colour.", response="Blue")
    (item,) = encode_examples([example], "instruction", tokenizer, max_length=128)
    ids, labels = item["input_ids"], item["labels"]
    prompt = prompt_ids(tokenizer, example.text)
    expected_prompt = (
        "<|user|>Name a colour.\n<|assistant|>"
        if templated
        else PLAIN_PROMPT.format(instruction="Name a colour.")
    )
    assert tokenizer.decode(prompt) == expected_prompt
    assert ids.tolist() == prompt + tokenizer.encode("Blue") + [tokenizer.eos_token_id]
    assert (labels[: len(prompt)] == IGNORE_INDEX).all()
    assert torch.equal(labels[len(prompt) :], ids[len(prompt) :])
    assert tokenizer.decode(labels[len(prompt) :]) == "Blue<eos>"
    assert item["attention_mask"].tolist() == [1] * len(ids)
    assert ids.dtype == labels.dtype == torch.long and ids.dim() == 1


def test_long_response_is_cut_from_the_right(plain: PreTrainedTokenizerFast) -> None:
    example = Example(text="Q", response="r" * 500)
    (item,) = encode_examples([example], "instruction", plain, max_length=64)
    prompt = prompt_ids(plain, "Q")
    assert len(item["input_ids"]) == 64
    assert item["input_ids"][: len(prompt)].tolist() == prompt
    assert (item["labels"][len(prompt) :] == ord("r") - 33).all()


def test_long_prompt_is_cut_from_the_left_keeping_response(plain: PreTrainedTokenizerFast) -> None:
    example = Example(text="p" * 500, response="answer")
    (item,) = encode_examples([example], "instruction", plain, max_length=32)
    ids, labels = item["input_ids"], item["labels"]
    learned = labels[labels != IGNORE_INDEX]
    assert len(ids) <= 32
    assert plain.decode(learned) == "answer<eos>"
    # The end of the prompt (the cue to answer) survives.
    assert str(plain.decode(ids[: len(ids) - len(learned)])).endswith("### Response:\n")


def test_fit_prompt_response() -> None:
    assert fit_prompt_response([1, 2], [3, 4], 8) == ([1, 2], [3, 4])
    assert fit_prompt_response([1, 2], [3, 4, 5, 6], 4) == ([1, 2], [3, 4])
    assert fit_prompt_response([1, 2, 3, 4, 5, 6], [7, 8, 9], 4) == ([5, 6], [7, 8])
    assert fit_prompt_response([1, 2, 3, 4], [7], 4) == ([2, 3, 4], [7])


def test_text_labels_are_the_input_ids(plain: PreTrainedTokenizerFast) -> None:
    items = encode_examples([Example(text="abc"), Example(text="x" * 50)], "text", plain, 16)
    # One token per byte; printable ASCII byte b has id b - 33 in the byte-level alphabet.
    assert items[0]["input_ids"].tolist() == [64, 65, 66]
    assert len(items[1]["input_ids"]) == 16
    for item in items:
        assert torch.equal(item["labels"], item["input_ids"])


def test_classification_labels_are_scalars(plain: PreTrainedTokenizerFast) -> None:
    examples = [Example(text="hello", label=3), Example(text="x" * 40, label=0)]
    items = encode_examples(examples, "classification", plain, max_length=10)
    assert [item["labels"].dim() for item in items] == [0, 0]
    assert [int(item["labels"]) for item in items] == [3, 0]
    assert len(items[1]["input_ids"]) == 10
    with pytest.raises(DataError, match="without a label"):
        encode_examples([Example(text="x")], "classification", plain, 10)


def test_collate_pads_token_batches() -> None:
    items = [
        {
            "input_ids": torch.tensor([5, 6, 7]),
            "attention_mask": torch.ones(3, dtype=torch.long),
            "labels": torch.tensor([-100, 6, 7]),
        },
        {
            "input_ids": torch.tensor([8]),
            "attention_mask": torch.ones(1, dtype=torch.long),
            "labels": torch.tensor([8]),
        },
    ]
    batch = collate(items, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_stacks_class_labels(plain: PreTrainedTokenizerFast) -> None:
    examples = [Example(text="a", label=1), Example(text="bcd", label=2)]
    batch = collate(encode_examples(examples, "classification", plain, 8), pad_token_id=257)
    assert batch["labels"].tolist() == [1, 2]
    assert batch["input_ids"][0].tolist() == [64, 257, 257]
    mixed = encode_examples([Example(text="a")], "text", plain, 8) + encode_examples(
        examples[:1], "classification", plain, 8
    )
    with pytest.raises(ValueError, match="mixes"):
        collate(mixed, 0)


def _items(n: int) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "input_ids": torch.tensor([i]),
            "attention_mask": torch.tensor([1]),
            "labels": torch.tensor(i),
        }
        for i in range(n)
    ]


def _take(batches: object, count: int) -> list[list[int]]:
    iterator = iter(batches)  # type: ignore[call-overload]
    return [next(iterator)["labels"].tolist() for _ in range(count)]


def test_iterate_batches_is_seeded_and_epoch_shuffled() -> None:
    items = _items(10)
    first = _take(iterate_batches(items, 4, seed=7, pad_token_id=0), 6)
    assert first == _take(iterate_batches(items, 4, seed=7, pad_token_id=0), 6)
    assert first != _take(iterate_batches(items, 4, seed=8, pad_token_id=0), 6)
    assert all(len(batch) == 4 for batch in first)
    # Two full batches per epoch of 10; no example twice within an epoch.
    for epoch in range(3):
        seen = first[2 * epoch] + first[2 * epoch + 1]
        assert len(set(seen)) == 8
    assert first[:2] != first[2:4]


def test_tiny_site_batches_everything() -> None:
    batches = _take(iterate_batches(_items(3), 8, seed=0, pad_token_id=0), 2)
    assert [sorted(batch) for batch in batches] == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(DataError, match="no examples"):
        next(iterate_batches([], 8, 0, 0))


def test_eval_batches_is_one_ordered_pass() -> None:
    batches = [b["labels"].tolist() for b in eval_batches(_items(5), 2, pad_token_id=0)]
    assert batches == [[0, 1], [2, 3], [4]]
