"""Tests for common.data, common.partition and the file reading in common.records."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from common.config import DataConfig
from common.data import Dataset, Example, load_dataset, sort_label_names, text_chunks
from common.errors import ConfigError, DataError
from common.partition import eval_sample, partition, site_data, split_holdout

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def _cfg(path: Path | str = "unused.jsonl", **kwargs: Any) -> DataConfig:
    return DataConfig(path=Path(path), **kwargs)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _classification(labels: list[str], groups: list[str] | None = None) -> Dataset:
    names = sorted(set(labels))
    examples = [
        Example(text=f"text {i}", label=names.index(label), group=(groups or labels)[i])
        for i, label in enumerate(labels)
    ]
    return Dataset(examples, "classification", names, Path("memory.csv"))


# --------------------------------------------------------------------------- formats


def test_instruction_jsonl_joins_context_and_reads_group(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Name a fruit.", "context": "", "response": "Apple", "category": "a"},
            {
                "instruction": "Summarize.",
                "context": "Long text.",
                "response": "Short",
                "category": "b",
            },
        ],
    )
    dataset = load_dataset(_cfg(path, by="category"))
    assert dataset.kind == "instruction"
    assert dataset.label_names is None
    assert dataset.source == path
    assert dataset.examples == [
        Example(text="Name a fruit.", response="Apple", group="a"),
        Example(text="Summarize.\n\nLong text.", response="Short", group="b"),
    ]


def test_classification_csv_with_quoted_commas(tmp_path: Path) -> None:
    path = _csv(
        tmp_path / "b.csv",
        ["text", "category"],
        [["Hi, where is my card?", "card_arrival"], ["Stop it", "cancel"], ["Hm, ok", "cancel"]],
    )
    dataset = load_dataset(_cfg(path, label_column="category"))
    assert dataset.kind == "classification"
    assert dataset.label_names == ["cancel", "card_arrival"]
    assert [e.text for e in dataset.examples] == ["Hi, where is my card?", "Stop it", "Hm, ok"]
    assert [e.label for e in dataset.examples] == [1, 0, 0]
    assert [e.group for e in dataset.examples] == ["card_arrival", "cancel", "cancel"]


def test_classification_jsonl_int_labels_keep_their_numeric_order(tmp_path: Path) -> None:
    labels = [0, 1, 2, 10, 2, 1]
    path = _jsonl(
        tmp_path / "c.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(labels)]
    )
    dataset = load_dataset(_cfg(path))
    assert dataset.label_names == ["0", "1", "2", "10"]
    assert [e.label for e in dataset.examples] == [0, 1, 2, 3, 2, 1]


def test_string_labels_sort_as_strings() -> None:
    assert sort_label_names({"b", "a", "10", "9"}) == ["10", "9", "a", "b"]
    assert sort_label_names({"10", "9", "-1"}) == ["-1", "9", "10"]


def test_configurable_column_names(tmp_path: Path) -> None:
    rows = [{"prompt": "Q?", "input": "ctx", "output": "A", "domain": "x"}]
    path = _jsonl(tmp_path / "alpaca.jsonl", rows)
    cfg = _cfg(
        path,
        instruction_column="prompt",
        context_column="input",
        response_column="output",
        by="domain",
    )
    assert load_dataset(cfg).examples == [Example(text="Q?\n\nctx", response="A", group="x")]
    path = _csv(tmp_path / "intent.csv", ["sentence", "intent"], [["a", "x"], ["b", "y"]])
    dataset = load_dataset(_cfg(path, text_column="sentence", label_column="intent"))
    assert (dataset.kind, dataset.label_names) == ("classification", ["x", "y"])


@pytest.mark.parametrize(
    ("name", "content", "kind"),
    [
        ("a.jsonl", '{"instruction": "i", "response": "r"}\n', "instruction"),
        ("a.json", '[{"instruction": "i", "response": "r"}]', "instruction"),
        ("a.jsonl", '{"text": "t", "label": 0}\n{"text": "u", "label": 1}\n', "classification"),
        ("a.csv", "instruction,response\ni,r\n", "instruction"),
        ("a.csv", "text,label\nt,x\nu,y\n", "classification"),
        ("a.txt", "Some text.\n\nMore text.\n", "text"),
    ],
)
def test_auto_detection(tmp_path: Path, name: str, content: str, kind: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert load_dataset(_cfg(path)).kind == kind


def test_explicit_format_overrides_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("# Title\n\nBody.\n", encoding="utf-8")
    assert load_dataset(_cfg(path, format="text")).examples == [Example(text="# Title\n\nBody.")]
    path = tmp_path / "rows.data"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n', encoding="utf-8")
    assert load_dataset(_cfg(path, format="classification")).label_names == ["x", "y"]


def test_text_file_is_cut_into_paragraph_chunks(tmp_path: Path) -> None:
    paragraphs = [f"SPEAKER {i}:\n" + "word " * (i * 7) for i in range(40)]
    path = tmp_path / "play.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    dataset = load_dataset(_cfg(path), text_chunk_chars=200)
    chunks = [e.text for e in dataset.examples]
    assert dataset.kind == "text" and len(chunks) > 1
    assert all(len(chunk) <= 200 for chunk in chunks)
    # Every short paragraph stays whole inside one chunk.
    for paragraph in paragraphs:
        if len(paragraph) <= 200:
            assert any(paragraph.strip("\n") in chunk for chunk in chunks)
    assert " ".join(chunks).split() == " ".join(paragraphs).split()


def test_text_chunks_split_long_lines() -> None:
    chunks = text_chunks("x" * 25 + "\nshort\n\nnext", 10)
    assert chunks == ["x" * 10, "x" * 10, "xxxxx", "short", "next"]
    assert text_chunks("ab\ncd\n\n\nef\n", 10) == ["ab\ncd\n\nef"]
    assert text_chunks("aaa bbb ccc ddd", 8) == ["aaa bbb", "ccc ddd"]
    with pytest.raises(ValueError):
        text_chunks("abc", 0)


def test_shipped_example_files_load() -> None:
    dolly = load_dataset(_cfg(EXAMPLES / "dolly-tiny.jsonl", by="category"))
    assert dolly.kind == "instruction" and len(dolly.examples) == 150
    assert Counter(e.group for e in dolly.examples) == {
        "brainstorming": 50,
        "classification": 50,
        "closed_qa": 50,
    }
    train = load_dataset(_cfg(EXAMPLES / "banking77-train.csv", label_column="category"))
    names = json.loads((EXAMPLES / "banking77-categories.json").read_text(encoding="utf-8"))
    assert len(train.examples) == 10_003 and sorted(train.label_names or []) == sorted(names)
    test = load_dataset(
        _cfg(EXAMPLES / "banking77-test.csv", label_column="category"),
        label_names=train.label_names,
    )
    assert len(test.examples) == 3_080 and Counter(e.label for e in test.examples)[0] == 40
    text = load_dataset(_cfg(EXAMPLES / "tinyshakespeare-slice.txt"))
    assert text.kind == "text" and all(len(e.text) <= 512 for e in text.examples)


def test_label_ids_agree_across_subsets(tmp_path: Path) -> None:
    labels = ["red", "green", "blue", "amber"]
    full = _csv(
        tmp_path / "full.csv", ["text", "label"], [[f"t{i}", v] for i, v in enumerate(labels)]
    )
    names = load_dataset(_cfg(full)).label_names
    first = _csv(tmp_path / "s1.csv", ["text", "label"], [["a", "red"], ["b", "green"]])
    second = _csv(tmp_path / "s2.csv", ["text", "label"], [["c", "green"], ["d", "amber"]])
    ids1 = {e.text: e.label for e in load_dataset(_cfg(first), label_names=names).examples}
    ids2 = {e.text: e.label for e in load_dataset(_cfg(second), label_names=names).examples}
    assert names == ["amber", "blue", "green", "red"]
    assert ids1 == {"a": 3, "b": 2} and ids2 == {"c": 2, "d": 0}
    # Without the shared names, the ids would differ ("green" is 0 in s1 but 1 in s2).
    assert load_dataset(_cfg(first)).label_names != load_dataset(_cfg(second)).label_names


def test_label_outside_label_names_names_file_line_and_label(tmp_path: Path) -> None:
    path = _csv(tmp_path / "s.csv", ["text", "label"], [["a", "red"], ["b", "purple"]])
    with pytest.raises(DataError, match=r"s\.csv, line 3: label 'purple' is not one of"):
        load_dataset(_cfg(path), label_names=["green", "red"])


# --------------------------------------------------------------------------- errors

INSTRUCTION = '{"instruction": "i", "response": "r"}\n'
LONG_LINE = '{"instruction": "' + "x" * 1_000_001 + '", "response": "r"}\n'


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", r"empty\.jsonl: the file is empty"),
        ("blank.txt", b"\n \n", r"blank\.txt: the file is empty"),
        ("utf.jsonl", INSTRUCTION.encode() + b'{"instruction": "\xff"}\n', r"line 2: .*UTF-8"),
        ("utf.txt", b"fine\nfine\n\xc3(\n", r"utf\.txt, line 3: .*not valid UTF-8"),
        ("bad.jsonl", (INSTRUCTION * 2 + "{oops\n").encode(), r"bad\.jsonl, line 3: invalid JSON"),
        ("list.jsonl", (INSTRUCTION + "[1, 2]\n").encode(), r"line 2: expected a JSON object"),
        (
            "col.jsonl",
            (INSTRUCTION + '{"instruction": "i", "answer": "r"}\n').encode(),
            r"col\.jsonl, line 2: missing column 'response' \(columns found: 'instruction', "
            r"'answer'\); set data\.response-column",
        ),
        (
            "emptytext.jsonl",
            (INSTRUCTION + '{"instruction": "  ", "response": "r"}\n').encode(),
            r"emptytext\.jsonl, line 2: column 'instruction' is empty",
        ),
        (
            "notstr.jsonl",
            b'{"instruction": 5, "response": "r"}\n',
            r"line 1: column 'instruction' must be a string",
        ),
        (
            "long.jsonl",
            (INSTRUCTION + LONG_LINE).encode(),
            r"long\.jsonl, line 2: .*1,000,000 bytes",
        ),
        ("header.csv", b"text,label\n", r"header\.csv: no examples found"),
        ("fields.csv", b"text,label\na,x\nb,y,z\n", r"fields\.csv, line 3: 3 fields; expected 2"),
        ("one.csv", b"text,label\na,x\nb,x\n", r"one\.csv: .*at least 2 distinct labels"),
        (
            "emptylabel.csv",
            b"text,label\na,x\nb,\n",
            r"emptylabel\.csv, line 3: column 'label' is empty",
        ),
        (
            "listlabel.jsonl",
            b'{"text": "a", "label": [1]}\n',
            r"line 1: column 'label' must be a string or integer",
        ),
        ("cols.jsonl", b'{"question": "q", "answer": "a"}\n', r"cols\.jsonl, line 1: cannot tell"),
        ("data.pq", b"PAR1", r"data\.pq: cannot tell the format from the suffix"),
        ("data.parquet", b"PAR1", r"data\.parquet: datasets cannot read it"),
        ("arr.json", b'[{"instruction": "i",}]', r"arr\.json, line 1: invalid JSON"),
    ],
)
def test_data_errors_name_file_and_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_dataset(_cfg(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_dataset(_cfg(tmp_path / "nope.jsonl"))


def test_missing_by_column_names_data_by(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "response": "r"}])
    with pytest.raises(DataError, match=r"line 1: missing column 'category'.*data\.by"):
        load_dataset(_cfg(path, by="category"))


# --------------------------------------------------------------------------- partitioning

LABELS = [f"l{i % 5}" for i in range(200)]


def _check_partition(parts: list[list[int]], total: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(total)), "sites must be disjoint and cover every example"
    assert all(parts), "no site may be empty"


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("dirichlet", {"alpha": 1.0, "by": "g"})],
)
def test_seeded_partitions_are_disjoint_complete_and_deterministic(
    kind: str, extra: dict[str, Any]
) -> None:
    groups = [f"g{i % 3}" for i in range(200)]
    dataset = _classification(LABELS, groups if "by" in extra else None)
    parts = partition(dataset, 4, _cfg(partition=kind, seed=1, **extra))
    _check_partition(parts, 200)
    assert parts == partition(dataset, 4, _cfg(partition=kind, seed=1, **extra))
    assert parts != partition(dataset, 4, _cfg(partition=kind, seed=2, **extra))
    if kind == "iid":
        assert sorted(len(p) for p in parts) == [50, 50, 50, 50]


def _label_skew(dataset: Dataset, parts: list[list[int]]) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""

    def mix(indices: list[int]) -> dict[int | None, float]:
        counts = Counter(dataset.examples[i].label for i in indices)
        return {label: n / len(indices) for label, n in counts.items()}

    overall = mix(list(range(len(dataset.examples))))
    distances = []
    for part in parts:
        site = mix(part)
        distances.append(0.5 * sum(abs(site.get(k, 0) - overall[k]) for k in overall))
    return sum(distances) / len(distances)


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    dataset = load_dataset(_cfg(EXAMPLES / "banking77-train.csv", label_column="category"))
    skewed = partition(dataset, 5, _cfg(partition="dirichlet", alpha=0.1))
    even = partition(dataset, 5, _cfg(partition="dirichlet", alpha=100.0))
    _check_partition(skewed, len(dataset.examples))
    _check_partition(even, len(dataset.examples))
    assert _label_skew(dataset, skewed) > 0.4
    assert _label_skew(dataset, even) < 0.1


def test_dirichlet_that_leaves_a_site_empty_is_a_config_error() -> None:
    dataset = _classification(["a", "a", "a", "b"])
    with pytest.raises(ConfigError, match=r"larger data\.alpha or fewer federation\.sites"):
        partition(dataset, 3, _cfg(partition="dirichlet", alpha=0.001))


def test_dirichlet_instruction_data_needs_by() -> None:
    dataset = Dataset([Example(text="i", response="r")] * 4, "instruction", None, Path("d.jsonl"))
    with pytest.raises(DataError, match=r"data\.by"):
        partition(dataset, 2, _cfg(partition="dirichlet"))


def test_by_column_deals_values_by_frequency() -> None:
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"]
    dataset = _classification(["x", "y"] * 6, groups)
    parts = partition(dataset, 2, _cfg(partition="by-column", by="g"))
    _check_partition(parts, 12)
    values = [{groups[i] for i in part} for part in parts]
    # Ranked a(5), b(3), c(3), d(1): site 0 gets ranks 0 and 2, site 1 ranks 1 and 3.
    assert values == [{"a", "c"}, {"b", "d"}]


def test_by_column_on_shipped_dolly_gives_one_category_per_site() -> None:
    cfg = _cfg(EXAMPLES / "dolly-tiny.jsonl", partition="by-column", by="category")
    dataset = load_dataset(cfg)
    parts = partition(dataset, 3, cfg)
    _check_partition(parts, 150)
    assert [len({dataset.examples[i].group for i in part}) for part in parts] == [1, 1, 1]


def test_by_column_needs_as_many_values_as_sites() -> None:
    dataset = _classification(["x", "y"] * 4, ["a", "b"] * 4)
    with pytest.raises(ConfigError, match=r"data\.by = 'g' has 2 distinct.*federation\.sites = 3"):
        partition(dataset, 3, _cfg(partition="by-column", by="g"))


def test_pathological_gives_each_site_k_labels_and_covers_every_label() -> None:
    labels = [f"l{i % 7}" for i in range(70)]  # 7 labels x 10 examples
    dataset = _classification(labels)
    cfg = _cfg(partition="pathological", labels_per_site=2)
    parts = partition(dataset, 4, cfg)
    _check_partition(parts, 70)
    held = [{labels[i] for i in part} for part in parts]
    assert [len(h) for h in held] == [2, 2, 2, 2]
    assert set().union(*held) == set(labels)
    assert partition(dataset, 4, cfg) == parts  # seeded
    assert partition(dataset, 4, _cfg(partition="pathological", labels_per_site=2, seed=1)) != parts


def test_pathological_shares_a_label_held_by_two_sites() -> None:
    labels = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    dataset = _classification(labels)
    parts = partition(dataset, 2, _cfg(partition="pathological", labels_per_site=2))
    _check_partition(parts, 30)
    # 4 slots over 3 labels: one label is held by both sites and its 10 examples split 5/5.
    shared = set.intersection(*({labels[i] for i in part} for part in parts))
    assert len(shared) == 1
    label = shared.pop()
    assert [sum(labels[i] == label for i in part) for part in parts] == [5, 5]


@pytest.mark.parametrize("k", [1, 8])
def test_pathological_that_cannot_cover_every_label_is_a_config_error(k: int) -> None:
    dataset = _classification([f"l{i % 7}" for i in range(70)])
    with pytest.raises(ConfigError, match=r"data\.labels-per-site = \d+.*expected 4 <= k <= 7"):
        partition(dataset, 2, _cfg(partition="pathological", labels_per_site=k))


def test_pathological_by_default_gives_the_fewest_labels_that_cover_all() -> None:
    labels = [f"l{i % 7}" for i in range(70)]
    parts = partition(_classification(labels), 3, _cfg(partition="pathological"))
    _check_partition(parts, 70)
    # ceil(7 / 3) = 3 labels a site: 9 slots over 7 labels, so two labels are held twice.
    assert [len({labels[i] for i in part}) for part in parts] == [3, 3, 3]


def test_more_sites_than_examples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"federation\.sites = 5"):
        partition(_classification(["a", "b", "a"]), 5, _cfg())


def test_one_site_gets_everything() -> None:
    dataset = _classification(LABELS)
    for kind in ("iid", "dirichlet"):
        assert partition(dataset, 1, _cfg(partition=kind)) == [list(range(200))]


# --------------------------------------------------------------------------- held-out split


def _numbered(n: int) -> list[Example]:
    return [Example(text=str(i)) for i in range(n)]


@pytest.mark.parametrize(
    ("n", "fraction", "heldout"),
    [
        (100, 0.1, 10),
        (10, 0.25, 2),
        (2, 0.1, 1),
        (5, 0.01, 1),
        (1, 0.5, 0),
        (7, 0.0, 0),
        (3, 0.9, 2),
    ],
)
def test_holdout_sizes(n: int, fraction: float, heldout: int) -> None:
    data = split_holdout(_numbered(n), fraction, seed=0)
    assert len(data.heldout) == heldout and len(data.train) == n - heldout
    assert sorted(int(e.text) for e in data.train + data.heldout) == list(range(n))


def test_holdout_is_seeded_and_capped() -> None:
    examples = _numbered(50)
    assert split_holdout(examples, 0.2, 3) == split_holdout(examples, 0.2, 3)
    assert split_holdout(examples, 0.2, 3) != split_holdout(examples, 0.2, 4)
    capped = split_holdout(examples, 0.2, 3, max_train=7, max_heldout=4)
    full = split_holdout(examples, 0.2, 3)
    assert capped.train == full.train[:7] and capped.heldout == full.heldout[:4]
    with pytest.raises(ConfigError, match=r"data\.holdout"):
        split_holdout(examples, 1.0, 0)


def test_site_data_splits_the_sites_partition() -> None:
    dataset = _classification(LABELS)
    cfg = _cfg(holdout=0.2, max_examples_per_site=30, max_eval_examples=5)
    parts = partition(dataset, 4, cfg)
    for site in range(4):
        data = site_data(dataset, site, 4, cfg)
        assert (len(data.train), len(data.heldout)) == (30, 5)
        mine = {dataset.examples[i].text for i in parts[site]}
        assert {e.text for e in data.train + data.heldout} <= mine
    with pytest.raises(ConfigError):
        site_data(dataset, 4, 4, cfg)


def test_eval_sample_is_seeded_and_spans_a_label_sorted_file() -> None:
    test = load_dataset(
        _cfg(EXAMPLES / "banking77-test.csv", label_column="category", format="classification")
    )
    assert len({e.label for e in test.examples[:64]}) < 5  # the file is sorted by label
    sample = eval_sample(test.examples, 64, seed=0)
    assert len(sample) == 64 and len({e.label for e in sample}) > 30
    assert sample == eval_sample(test.examples, 64, seed=0)
    assert sample != eval_sample(test.examples, 64, seed=1)
    assert eval_sample(test.examples[:10], 64, seed=0) == test.examples[:10]
