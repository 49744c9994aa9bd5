"""Label skew through the real apps (on the in-process runtime): each site holds 2 of 16 labels
(a pathological split).

With the old defaults (a fresh local AdamW each round, FedAvg) every site's steps push down the
14 labels it lacks at full Adam step size, the average cancels, and the global classifier
stays near chance. The skew-robust setting of ``examples/banking77.toml`` (local SGD, whose
steps are linear in the gradients, and FedAdam at the coordinator: Reddi et al. 2021) learns.
A tiny random Llama classifier (seeded) on a synthetic intent set keeps it to seconds a round.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest

from common.config import RunConfig, load_config
from fedlora.simulate import simulate

pytestmark = pytest.mark.slow

LABELS = [chr(ord("a") + i) for i in range(16)]
WORDS = ["the", "card", "bank", "please", "my", "account", "when", "help", "money", "why"]
ROBUST = [
    "train.optimizer='sgd'",
    "train.lr=0.1",
    "aggregation.server-optimizer='fedadam'",
    "aggregation.server-lr=0.01",
    "aggregation.server-tau=1e-6",
]


def _write_intents(path: Path, per_label: int, rng: random.Random) -> None:
    """Rows ``<words> <label x3> <words>``: the intent is a keyword inside the text."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        for i in range(per_label * len(LABELS)):
            label = LABELS[i % len(LABELS)]
            before = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
            after = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
            writer.writerow([f"{before} {label * 3} {after}", f"intent-{label}"])


@pytest.fixture(scope="module")
def skewed_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("skew")
    rng = random.Random(0)
    _write_intents(folder / "train.csv", 40, rng)
    _write_intents(folder / "test.csv", 8, rng)
    (folder / "skew.toml").write_text(
        """
[model]
name = "tiny-llama"
task = "classification"
device = "cpu"

[data]
path = "train.csv"
eval-path = "test.csv"
format = "classification"
partition = "pathological"
labels-per-site = 2
holdout = 0.1
max-eval-examples = 128

[federation]
sites = 8
rounds = 16

[train]
local-steps = 5
batch-size = 8
max-length = 32
lr = 1e-2

[modules.shared]
rank = 4
alpha = 8
targets = ["q_proj", "v_proj"]

[privacy]
mode = "sealed"
encoding = "fp32"

[simulation]
backend = "in-process"
""",
        encoding="utf-8",
    )
    return folder / "skew.toml"


def _global_accuracy(cfg: RunConfig, out: Path) -> list[float]:
    simulate(cfg, out)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [float(line["global_eval_accuracy"]) for line in lines]


@pytest.fixture(scope="module")
def accuracies(skewed_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("runs")
    old = load_config(skewed_config)
    robust = load_config(skewed_config, ROBUST)
    assert old.train.optimizer == "adamw" and old.aggregation.server_optimizer == "sgd"
    return {
        "old": _global_accuracy(old, out / "old"),
        "robust": _global_accuracy(robust, out / "robust"),
    }


def test_split_is_pathological(skewed_config: Path) -> None:
    from common.data import load_dataset
    from common.partition import site_data

    cfg = load_config(skewed_config)
    dataset = load_dataset(cfg.data)
    held = [{e.label for e in site_data(dataset, i, 8, cfg.data).train} for i in range(8)]
    assert all(len(labels) == 2 for labels in held)
    assert set().union(*held) == set(range(16))


def test_old_defaults_stay_near_chance(accuracies: dict[str, Any]) -> None:
    # 16 labels: chance is 6.25 %. The sites' opposing full-size pushes cancel: the old
    # defaults hover near chance for half the run and creep up only slowly after.
    old = accuracies["old"]
    assert max(old[:9]) < 0.15, old
    assert max(old) < 0.3, old


def test_skew_robust_setting_learns(accuracies: dict[str, Any]) -> None:
    robust, old = accuracies["robust"], accuracies["old"]
    assert robust[0] == pytest.approx(old[0])  # the same version 0
    assert robust[-1] >= 0.5, robust
    assert robust[-1] >= old[-1] + 0.3, (robust, old)
