"""``fedlora report`` on a real run of examples/tiny.toml and on small hand-written run folders."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from fedlora.report import (
    REPORT_FILE,
    Report,
    ReportError,
    write_report,
)
from fedlora.report_cli import add_report_parser, main, run_report
from fedlora.run_plots import PLOT_FILES, metric_series
from tests.helpers.in_process import IN_PROCESS

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ["site-0", "site-1", "site-2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3-site, 3-round federation of examples/tiny.toml (on the in-process runtime)."""
    out = tmp_path_factory.mktemp("report") / "tiny"
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "examples/tiny.toml", "--out", str(out),
           "--set", IN_PROCESS]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def tiny_report(tiny_run: Path) -> Report:
    return write_report(tiny_run)


def metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


@pytest.mark.slow
def test_report_has_every_section(tiny_run: Path, tiny_report: Report) -> None:
    text = tiny_report.markdown.read_text(encoding="utf-8")
    assert tiny_report.markdown == tiny_run / "report" / REPORT_FILE
    headings = ["# Run report: tiny", "## Summary", "## Loss", "## Accuracy",
                "## Bytes per round", "## Seconds per phase", "## Rounds",
                "## Lineage (registry)", "## Rejected replies", "## Configuration"]  # fmt: skip
    for heading in headings:
        assert f"\n{heading}\n" in f"\n{text}"
    for name in ("loss", "bytes", "seconds"):
        assert f"]({PLOT_FILES[name]})" in text
    # tiny.toml is a causal LM: no accuracy plot, and the report says so.
    assert "accuracy" not in tiny_report.plots
    assert "No accuracy recorded" in text
    assert '"name": "tiny-llama"' in text  # the run's config.json, embedded
    assert "\n| 3 | 3 | " in text  # the per-round table reaches round 3, version 3


@pytest.mark.slow
def test_plots_are_valid_pngs(tiny_report: Report) -> None:
    assert set(tiny_report.plots) == {"loss", "bytes", "seconds"}
    for path in tiny_report.plots.values():
        assert path.read_bytes()[:8] == PNG_MAGIC
        pixels = imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


@pytest.mark.slow
def test_loss_series_are_the_metrics(tiny_run: Path, tiny_report: Report) -> None:
    lines = metrics_lines(tiny_run)
    series = tiny_report.series["loss"]
    expected = {f"{site} {stage}" for site in SITES for stage in ("eval", "train")}
    expected |= {"global eval (sites, weighted)", "global train (sites, weighted)"}
    assert set(series) == expected  # tiny.toml has no global eval file
    rounds = [line["round"] for line in lines]
    assert series["global eval (sites, weighted)"] == (rounds, [x["eval_loss"] for x in lines])
    trained = [line for line in lines if line["round"] > 0]
    assert series["global train (sites, weighted)"][0] == [x["round"] for x in trained]
    for site in SITES:
        xs, ys = series[f"{site} eval"]
        assert xs == rounds
        assert ys == [x["sites"][site]["evaluate"]["eval_loss"] for x in lines]
        xs, ys = series[f"{site} train"]
        assert xs == [x["round"] for x in trained]  # no training in round 0
        assert ys == [x["sites"][site]["train"]["train_loss"] for x in trained]


@pytest.mark.slow
def test_bytes_and_seconds_series_are_the_metrics(tiny_run: Path, tiny_report: Report) -> None:
    lines = metrics_lines(tiny_run)
    rounds = [line["round"] for line in lines]
    assert tiny_report.series["bytes"] == {
        "bytes up": (rounds, [float(x["bytes_up"]) for x in lines]),
        "bytes down": (rounds, [float(x["bytes_down"]) for x in lines]),
    }
    assert tiny_report.series["seconds"] == {
        "train": (rounds, [x["seconds_train"] for x in lines]),
        "evaluate": (rounds, [x["seconds_eval"] for x in lines]),
    }


@pytest.mark.slow
def test_lineage_lists_every_version_with_its_digest(tiny_run: Path, tiny_report: Report) -> None:
    text = tiny_report.markdown.read_text(encoding="utf-8")
    for version in range(4):
        manifest = json.loads(
            (tiny_run / "registry" / "shared" / f"v{version:04d}" / "manifest.json").read_text()
        )
        digest = manifest["sha256"]["adapter_model.safetensors"][:12]
        parent = "-" if manifest["parent"] is None else str(manifest["parent"])
        assert f"| shared | {version} | {parent} | {version} | fedavg |" in text
        assert f"| {digest} |" in text


# ---------------------------------------------------------------------------- hand-written runs


def write_run(run_dir: Path, lines: list[dict[str, Any]], audit: list[dict[str, Any]]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if audit:
        (run_dir / "audit.jsonl").write_text("".join(json.dumps(x) + "\n" for x in audit))
    return run_dir


def classification_line(server_round: int, rejected: list[dict[str, str]]) -> dict[str, Any]:
    site = {"evaluate": {"eval_loss": 1.0 / (server_round + 1), "eval_accuracy": 0.5}}
    if server_round > 0:
        site["train"] = {"train_loss": 1.2, "train_accuracy": 0.4}
    return {
        "round": server_round, "version": server_round, "eval_loss": 1.0, "eval_accuracy": 0.6,
        "global_eval_loss": 0.9, "global_eval_accuracy": 0.7, "train_loss": None,
        "bytes_up": 10, "bytes_down": 20, "seconds_train": 0.1, "seconds_eval": 0.2,
        "cohort": ["a"], "rejected": rejected, "sites": {"a": site},
    }  # fmt: skip


def test_accuracy_plot_and_coordinator_series(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [classification_line(r, []) for r in range(3)], [])
    report = write_report(run, tmp_path / "out")
    assert set(report.plots) == {"loss", "accuracy", "bytes", "seconds"}
    accuracy = report.series["accuracy"]
    assert accuracy["global eval (coordinator)"] == ([0, 1, 2], [0.7, 0.7, 0.7])
    assert accuracy["a eval"] == ([0, 1, 2], [0.5, 0.5, 0.5])
    assert accuracy["a train"] == ([1, 2], [0.4, 0.4])
    assert "global train (sites, weighted)" not in report.series["loss"]  # all null: left out
    assert (tmp_path / "out" / PLOT_FILES["accuracy"]).read_bytes()[:8] == PNG_MAGIC
    text = report.markdown.read_text()
    assert "No config.json" in text and "No registry versions found." in text


def test_rejections_merge_audit_and_metrics(tmp_path: Path) -> None:
    late = {"site": "b", "reason": "delta holds NaN"}
    only_metrics = {"site": "c", "reason": "payload | too large"}
    lines = [classification_line(0, []), classification_line(1, [late, only_metrics])]
    audit = [
        {"event": "round-started", "round": 1, "seq": 0},
        {"event": "reply-rejected", "round": 1, "stage": "train", **late, "seq": 1},
    ]
    report = write_report(write_run(tmp_path / "run", lines, audit))
    text = report.markdown.read_text()
    section = text.split("## Rejected replies", 1)[1].split("##", 1)[0]
    assert "| 1 | train | b | delta holds NaN | audit |" in section
    assert "| 1 | - | c | payload \\| too large | metrics |" in section
    assert section.count("delta holds NaN") == 1  # listed once though in both files


def test_metric_series_skips_missing_values() -> None:
    lines = [{"round": 0, "eval_loss": None, "sites": {}}, {"round": 1, "eval_loss": 2.0}]
    assert metric_series(lines, "loss") == {"global eval (sites, weighted)": ([1], [2.0])}


def test_missing_or_empty_run_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"no metrics\.jsonl lines"):
        write_report(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    write_run(tmp_path / "bad", [{"eval_loss": 1.0}], [])
    with pytest.raises(ReportError, match="integer 'round'"):
        write_report(tmp_path / "bad")


def test_main_writes_the_report(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [classification_line(r, []) for r in range(2)], [])
    assert main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / REPORT_FILE).is_file()


def test_report_parser_plugs_into_a_command(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [classification_line(0, [])], [])
    parser = argparse.ArgumentParser(prog="fedlora")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "out")])
    assert args.command == "report"
    assert run_report(args) == 0
    assert (tmp_path / "out" / REPORT_FILE).is_file()
