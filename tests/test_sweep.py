"""`fedlora sweep`: the recommendation rule on known tables, the refusals, and one real sweep
of examples/tiny.toml over the adapter's rank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError
from fedlora.cli import main
from fedlora.sweep import NO_PICK, grid, markdown, parse_vary, plot_sweep
from fedlora.sweep_rule import Candidate, recommend
from tests.helpers.in_process import IN_PROCESS

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"


def rows(*table: tuple[str, float, float, int]) -> list[Candidate]:
    return [Candidate(*row) for row in table]


# ---------------------------------------------------------------------------- the rule


def test_accuracy_picks_the_cheapest_within_one_point() -> None:
    table = rows(
        ("rank=2", 0.785, 1000, 10),  # 1.5 points below the best: out
        ("rank=4", 0.79, 2000, 20),  # exactly 1 point below: in, and cheaper than rank=8
        ("rank=8", 0.80, 4000, 40),  # the best
    )
    chosen = recommend(table, classification=True)
    assert chosen is not None
    assert (chosen.index, chosen.label) == (1, "rank=4")
    assert "within 1 accuracy points of the best (80.0%, rank=8)" in chosen.reason
    assert recommend(table, classification=True, tolerance=2.0).label == "rank=2"


def test_only_the_best_within_tolerance() -> None:
    table = rows(("a", 0.50, 100, 1), ("b", 0.90, 900, 9), ("c", 0.70, 300, 3))
    chosen = recommend(table, classification=True, tolerance=0.0)
    assert chosen is not None and chosen.label == "b"
    assert "it has the best federated quality" in chosen.reason
    assert "the fewest of the 1 setting(s)" in chosen.reason


def test_everything_within_tolerance_picks_the_cheapest() -> None:
    table = rows(("a", 0.80, 300, 3), ("b", 0.805, 200, 2), ("c", 0.81, 100, 1))
    assert recommend(table, classification=True).label == "c"
    assert recommend(table, classification=True, tolerance=50).label == "c"


def test_ties_break_on_trainable_parameters_then_order() -> None:
    # Same bytes (e.g. train.lr values): fewer trainable parameters, then the earlier row.
    table = rows(("x", 0.80, 500, 40), ("y", 0.80, 500, 20), ("z", 0.80, 500, 20))
    assert recommend(table, classification=True).label == "y"


def test_perplexity_is_lower_is_better_within_percent() -> None:
    table = rows(
        ("rank=4", 10.3, 1000, 10),  # 3 % above the best: out of 2 %
        ("rank=8", 10.15, 2000, 20),  # 1.5 % above: in
        ("rank=16", 10.0, 4000, 40),  # the best (lowest)
    )
    assert recommend(table, classification=False).label == "rank=8"
    assert recommend(table, classification=False, tolerance=3.0).label == "rank=4"
    assert recommend(table, classification=False, tolerance=1.0).label == "rank=16"
    # Read as accuracy, the highest would be "best": the direction matters.
    assert recommend(table, classification=True, tolerance=0.0).label == "rank=4"


def test_a_diverged_setting_is_never_best_nor_recommended() -> None:
    table = rows(
        ("lr=1", math.nan, 100, 1), ("lr=0.1", math.inf, 100, 1), ("lr=0.01", 12.0, 100, 1)
    )
    chosen = recommend(table, classification=False)
    assert chosen is not None and chosen.label == "lr=0.01"
    assert recommend(rows(("lr=1", math.inf, 100, 1)), classification=False) is None


def test_an_empty_table_or_negative_tolerance_is_refused() -> None:
    with pytest.raises(ValueError, match="no rows"):
        recommend([], classification=True)
    with pytest.raises(ValueError, match="negative"):
        recommend(rows(("a", 0.5, 1, 1)), classification=True, tolerance=-1)


def test_a_table_where_every_run_diverged_is_written_without_a_pick(tmp_path: Path) -> None:
    row = {"setting": "train.lr=10", "overrides": ["train.lr=10"], "federated_quality": math.inf,
           "federated_own_quality": math.inf, "centralized_quality": None,
           "trainable_parameters": 896, "bytes_per_round": 28041.0, "peak_memory_bytes": None,
           "federated_seconds": 1.0, "centralized_seconds": None, "latency_unmerged_ms": None,
           "latency_merged_ms": None}  # fmt: skip
    assert recommend([Candidate("train.lr=10", math.inf, 28041.0, 896)], False) is None
    text = markdown([row], classification=False, reason=NO_PICK)
    assert "| train.lr=10 | inf | inf | - | 896 | 28,041 | - | 1.0 | - | - | - |" in text
    assert "**Recommended**: none" in text
    plot_sweep([row], None, classification=False, path=tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- the grid


def test_the_issue_keys_make_a_grid_of_valid_configs() -> None:
    """rank, lr, local steps and rounds, read as --set reads them; the first varies slowest."""
    vary = ["modules.shared.rank=2,8", "train.lr=1e-3,3e-2", "train.local-steps=1",
            "federation.rounds=2,5"]  # fmt: skip
    settings = grid(parse_vary(vary, load_config(TINY)))
    assert len(settings) == 2 * 2 * 1 * 2
    assert settings[0] == ["modules.shared.rank=2", "train.lr=1e-3", "train.local-steps=1",
                           "federation.rounds=2"]  # fmt: skip
    cfg = load_config(TINY, settings[-1])
    assert (cfg.modules["shared"].rank, cfg.train.lr) == (8, 0.03)
    assert (cfg.train.local_steps, cfg.federation.rounds) == (1, 5)


def test_a_key_varied_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="varied twice"):
        parse_vary(["train.lr=1e-3", "train.lr=2e-3"], load_config(TINY))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("vary", "words"),
    [
        ("modules.shared.rnak=2,4", ["modules.shared.rnak", "no such config key", "rank"]),
        ("modules.other.rank=2,4", ["modules.other.rank", "modules are shared"]),
        ("trian.lr=1e-3", ["trian.lr", "sections are", "train"]),
        ("train.lr=", ["train.lr", "no values"]),
        ("train.lr=,", ["train.lr", "no values"]),
        ("modules.shared.rank=4,2,4", ["modules.shared.rank", "'4' is given twice"]),
        ("train.lr=1e-3,0.001", ["train.lr", "'0.001' is given twice"]),
        ("train.lr", ["expected KEY=V1,V2"]),
    ],
)
def test_bad_vary_is_one_clear_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], vary: str, words: list[str]
) -> None:
    out = tmp_path / "out"
    assert main(["sweep", str(TINY), "--vary", vary, "--out", str(out)]) == 2
    said = " ".join(capsys.readouterr().out.split())
    for word in words:
        assert word in said
    assert not out.exists()


def test_a_bad_value_is_refused_before_any_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["sweep", str(TINY), "--vary", "modules.shared.rank=2,-1", "--out", str(out)]) == 2
    assert not out.exists()


def test_a_used_out_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "old.txt").write_text("x")
    argv = ["sweep", str(TINY), "--vary", "modules.shared.rank=2,4", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]


@pytest.mark.parametrize(
    ("arms", "words"), [("centralized", "needs the 'federated'"), ("federated,base", "once")]
)
def test_arms_that_do_not_sweep_are_a_usage_error(tmp_path: Path, arms: str, words: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        argv = ["sweep", str(TINY), "--vary", "train.lr=1e-3", "--out", str(out), "--arms", arms]
        main(argv)
    assert exit_info.value.code == 2
    assert not out.exists()


# ---------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
def test_rank_sweep_writes_the_table_and_picture(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["sweep", str(TINY), "--vary", "modules.shared.rank=2,4", "--out", str(out),
            "--set", "federation.rounds=1", "--set", IN_PROCESS]  # fmt: skip
    assert main(argv) == 0
    assert {"sweep.json", "sweep.md", "sweep.png"} <= {p.name for p in out.iterdir()}
    assert (out / "modules.shared.rank=2" / "compare.json").exists()
    assert (out / "modules.shared.rank=4" / "federated").is_dir()
    result = json.loads((out / "sweep.json").read_text())
    two, four = result["rows"]
    assert (two["setting"], four["setting"]) == ("modules.shared.rank=2", "modules.shared.rank=4")
    # LoRA's A (r x in) and B (out x r) factors: the trainable count is linear in the rank.
    assert four["trainable_parameters"] == 2 * two["trainable_parameters"]
    assert two["bytes_per_round"] > 0 and four["bytes_per_round"] > two["bytes_per_round"]
    for row in (two, four):
        assert row["federated_quality"] > 1 and row["centralized_quality"] > 1  # perplexity
        assert row["latency_merged_ms"] is not None
    assert result["quality"] == "perplexity" and result["tolerance"] == 2.0
    assert result["recommended"]["setting"] in {"modules.shared.rank=2", "modules.shared.rank=4"}
    text = (out / "sweep.md").read_text()
    assert "**Recommended**: " + result["recommended"]["reason"] in text
    assert "| modules.shared.rank=2 |" in text and "![sweep](sweep.png)" in text
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
