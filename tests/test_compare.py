"""`fedlora compare` on examples/tiny.toml: every arm on one split, through the real simulation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from common.config import load_config
from common.errors import ConfigError
from common.models import load_base
from fedlora.cli import main
from fedlora.compare import ARMS, compare, reference_train
from fedlora.comparison import Comparison
from server.metrics import read_metrics
from tests.helpers.in_process import IN_PROCESS

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"
COLUMNS = [
    "arm",
    "global perplexity",
    "own held-out perplexity",
    "global loss",
    "trainable params",
    "bytes moved",
    "wall s",
    "peak RSS GiB",
]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("compare") / "out"
    argv = ["compare", str(TINY), "--out", str(out),
            "--set", "federation.rounds=2", "--set", IN_PROCESS]  # fmt: skip
    assert main(argv) == 0
    return out, json.loads((out / "compare.json").read_text())


@pytest.mark.slow
def test_table_has_every_arm_and_column(compared: tuple[Path, dict[str, Any]]) -> None:
    out, result = compared
    assert sorted(result["arms"]) == sorted(ARMS)
    lines = (out / "compare.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| arm"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == COLUMNS
    start = lines.index(header) + 2
    rows = lines[start : start + len(ARMS)]
    assert [row.split("|")[1].strip() for row in rows] == list(ARMS)
    text = (out / "compare.md").read_text()
    assert "Inference latency" in text and "per site" in text
    # Per site (tiny.toml splits dolly by category): one row per site, a figure per arm.
    site_rows = [line for line in lines if line.startswith("| site-")]
    assert len(site_rows) == 3 and all(row.count("|") == 2 + 1 + len(ARMS) for row in site_rows)


@pytest.mark.slow
def test_figures_are_measured_and_consistent(compared: tuple[Path, dict[str, Any]]) -> None:
    out, result = compared
    arms = result["arms"]
    base = arms["base"]["quality"]
    for name in ("local-only", "federated", "centralized"):
        quality = arms[name]["quality"]
        assert all(math.isfinite(quality[k]) for k in ("global_loss", "site_loss")), name
        # Every trained arm learned something about the held-out data of its sites.
        assert quality["site_loss"] < base["site_loss"], name
        assert arms[name]["trainable_parameters"] > 0
        assert sorted(quality["sites"]) == ["site-0", "site-1", "site-2"], name
        assert sorted(quality["sites"]) == ["site-0", "site-1", "site-2"], name
    assert arms["base"]["bytes_moved"] == arms["local-only"]["bytes_moved"] == 0
    rounds = read_metrics(out / "federated")
    assert arms["federated"]["bytes_moved"] == sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
    assert arms["centralized"]["bytes_moved"] > 0  # the pooled training data
    assert all(value > 0 for value in result["latency"].values())
    # The federated arm is a real run: its registry holds every round's version.
    assert sorted(p.name for p in (out / "federated/registry/shared").iterdir()) == [
        "v0000",
        "v0001",
        "v0002",
    ]


@pytest.mark.slow
def test_curves_and_personalized_arm(compared: tuple[Path, dict[str, Any]]) -> None:
    out, result = compared
    curves = result["curves"]
    assert sorted(curves) == [
        "centralized",
        "centralized-equal-steps",
        "centralized-full",
        "federated",
        "local-only",
    ]
    rounds = read_metrics(out / "federated")
    # The federated curve is every round of the run's metrics, bytes accumulated.
    assert [p["round"] for p in curves["federated"]] == [0, 1, 2]
    assert [p["own"] for p in curves["federated"]] == [r["eval_perplexity"] for r in rounds]
    assert curves["federated"][-1]["bytes"] == result["arms"]["federated"]["bytes_moved"]
    # The in-process arms' last point is the arm's own final figure.
    for arm in ("local-only", "centralized", "centralized-equal-steps", "centralized-full"):
        assert [p["round"] for p in curves[arm]] == [1, 2], arm
        final = result["arms"][arm]["quality"]
        assert curves[arm][-1]["global"] == pytest.approx(final["global_perplexity"]), arm
    reach = result["rounds_to_reach_centralized"]
    assert sorted(reach) == ["90%", "95%", "centralized_best", "centralized_best_round"]
    best = min(p["global"] for p in curves["centralized"])  # perplexity: lower is better
    assert reach["centralized_best"] == pytest.approx(best)
    assert (out / "curves-round.png").stat().st_size > 0
    assert (out / "curves-bytes.png").stat().st_size > 0
    text = (out / "compare.md").read_text()
    assert "![round](curves-round.png)" in text and "reaches 90% of it" in text
    # Personalized: the federated adapter fine-tuned at each site fits its own data better.
    arms = result["arms"]
    personal, fed = arms["personalized"]["quality"], arms["federated"]["quality"]
    assert result["personalize_steps"] == 4  # tiny.toml's train.local-steps
    assert personal["site_loss"] < fed["site_loss"]
    assert arms["personalized"]["bytes_moved"] == 0


@pytest.mark.slow
def test_full_fine_tuning_arm_is_reported(compared: tuple[Path, dict[str, Any]]) -> None:
    out, result = compared
    full, details = result["arms"]["centralized-full"], result["centralized_full"]
    cfg = load_config(TINY)
    numel = sum(p.numel() for p in load_base(cfg.model).model.parameters())
    assert full["trainable_parameters"] == numel
    lora = result["arms"]["centralized"]["trainable_parameters"]
    assert full["trainable_parameters"] > 10 * lora
    assert full["bytes_moved"] == result["arms"]["centralized"]["bytes_moved"]  # same pooled data
    assert full["quality"]["site_loss"] < result["arms"]["base"]["quality"]["site_loss"]
    assert full["peak_rss_bytes"] > 0
    assert details["full_federation_bytes_per_round_per_site"] == 8 * numel
    assert details["steps"] == 2 * 4 * 3  # rounds x local steps x sites, as centralized
    assert details["seconds_per_step"] > 0 and "skipped" not in details
    text = (out / "compare.md").read_text()
    assert "| centralized-full | " in text
    assert "a federation of full models would move" in text and "per optimizer step" in text


def test_refuses_fedsa_and_a_used_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedsa"):
        Comparison(load_config(TINY, ["aggregation.rule='fedsa'"]))
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        compare(load_config(TINY), tmp_path)


def test_reference_settings_override_train_keys_only() -> None:
    cfg = load_config(TINY)
    assert reference_train(cfg, []) is None
    reference = reference_train(cfg, ["train.optimizer='sgd'", "train.lr=0.5"])
    assert reference is not None
    assert (reference.optimizer, reference.lr) == ("sgd", 0.5)
    assert reference.local_steps == cfg.train.local_steps  # the rest is the run's
    plain = Comparison(cfg, reference=reference).plain.train
    assert (plain.optimizer, plain.lr, plain.classifier_loss) == ("sgd", 0.5, "plain")
    with pytest.raises(ConfigError, match=r"expected train\.KEY=VALUE"):
        reference_train(cfg, ["aggregation.server-lr=2"])
    with pytest.raises(ConfigError, match="lr"):
        reference_train(cfg, ["train.lr=-1"])


def test_arms_runs_only_the_named_arms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--arms base,centralized`: no federation, only those rows and only the lines they allow."""
    out = tmp_path / "out"
    assert (
        main(
            [
                "compare",
                str(TINY),
                "--out",
                str(out),
                "--set",
                "federation.rounds=1",
                "--arms",
                "base,centralized",
            ]
        )
        == 0
    )
    result = json.loads((out / "compare.json").read_text())
    assert list(result["arms"]) == ["base", "centralized"]
    assert sorted(result["curves"]) == ["centralized"]
    assert not (out / "federated").exists()
    assert result["verdicts"] == [] and result["rounds_to_reach_centralized"] == {}
    text = (out / "compare.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert "| base | " in text and "| centralized | " in text
    assert "federated" not in rows and "local-only" not in rows
    assert "centralized-full" not in text and "Inference latency" not in text
    # A long in-process arm says where it is (round k/N, elapsed, ETA) at each curve round.
    assert "centralized: round 1/1, elapsed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arms", "words"),
    [
        ("federated,central", ["unknown arm 'central'", "centralized-equal-steps"]),
        ("personalized,centralized", ["personalized", "add 'federated'"]),
        (",", ["no arm named"]),
    ],
)
def test_arms_that_cannot_run_are_a_usage_error(
    tmp_path: Path, arms: str, words: list[str]
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(TINY), "--out", str(out), "--arms", arms])
    assert exit_info.value.code == 2
    assert not out.exists()
