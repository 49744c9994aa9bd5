"""Cut the small example data files shipped in examples/data from the full public data sets.

    python examples/data/make_slices.py --shared ../shared/data

``--shared`` is a folder holding ``databricks-dolly-15k/databricks-dolly-15k.jsonl``,
``banking77/{train,test}.csv``, ``banking77/categories.json`` and ``tinyshakespeare/input.txt``
(see README.md for where they come from). The cut is deterministic: the same inputs give
byte-identical outputs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

SEED = 20240426
# Three Dolly categories with different answer styles (lists, labels, reading comprehension),
# so that splitting by category gives sites with genuinely different tasks.
DOLLY_CATEGORIES = ("brainstorming", "classification", "closed_qa")
# Characters of instruction + context + response: short rows keep CPU training at
# max-length 128-256 tokens meaningful (about 4 characters per token).
DEMO_MAX_CHARS, DEMO_ROWS_PER_CATEGORY = 600, 300
TINY_MAX_CHARS, TINY_ROWS_PER_CATEGORY = 400, 50
SHAKESPEARE_BYTES = 100_000
FIELDS = ("instruction", "context", "response", "category")


def _row_chars(row: dict[str, str]) -> int:
    return len(row["instruction"]) + len(row["context"]) + len(row["response"])


def dolly_slice(rows: list[dict[str, str]], max_chars: int, per_category: int) -> list[dict]:
    """``per_category`` random short rows of each category, in one seeded random order."""
    rng = random.Random(SEED)
    picked: list[dict[str, str]] = []
    for category in DOLLY_CATEGORIES:
        short = [r for r in rows if r["category"] == category and _row_chars(r) <= max_chars]
        if len(short) < per_category:
            raise SystemExit(f"only {len(short)} {category} rows of <= {max_chars} characters")
        picked.extend(rng.sample(short, per_category))
    rng.shuffle(picked)
    return [{key: row[key] for key in FIELDS} for row in picked]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def shakespeare_slice(text: str, max_bytes: int) -> str:
    """The first ``max_bytes`` of the text, ending at the last paragraph break before it."""
    head = text[:max_bytes]
    return head[: head.rindex("\n\n") + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, required=True, help="folder of the full data sets")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    shared, out = args.shared, args.out

    dolly_path = shared / "databricks-dolly-15k" / "databricks-dolly-15k.jsonl"
    with dolly_path.open(encoding="utf-8") as lines:
        # split("\n") semantics: iterating a text file splits on "\n" only, not on U+2028.
        rows = [json.loads(line) for line in lines if line.strip()]
    write_jsonl(out / "dolly-demo.jsonl", dolly_slice(rows, DEMO_MAX_CHARS, DEMO_ROWS_PER_CATEGORY))
    write_jsonl(out / "dolly-tiny.jsonl", dolly_slice(rows, TINY_MAX_CHARS, TINY_ROWS_PER_CATEGORY))

    for name in ("train.csv", "test.csv"):
        shutil.copyfile(shared / "banking77" / name, out / f"banking77-{name}")
    shutil.copyfile(shared / "banking77" / "categories.json", out / "banking77-categories.json")

    text = (shared / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    (out / "tinyshakespeare-slice.txt").write_text(
        shakespeare_slice(text, SHAKESPEARE_BYTES), encoding="utf-8", newline="\n"
    )


if __name__ == "__main__":
    main()
