"""``fedlora compare``'s arms kept on disk (fedlora/compare_progress.py), without a model: the
folder checks of a fresh start and of ``--resume``, an arm measured once, and the line a
stopped compare or sweep prints. ``tests/test_interrupt_compare.py`` sends real signals to real
commands."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError
from fedlora.cli import _parser
from fedlora.compare_cli import compare_command
from fedlora.compare_curves import CurvePoint
from fedlora.compare_measures import Arm, Quality
from fedlora.compare_progress import (
    ARMS_FOLDER,
    SETTINGS_FILE,
    ArmLedger,
    CompareInterrupted,
    Measured,
    compare_settings,
    interrupted_line,
)
from fedlora.interrupt import RunInterrupted
from fedlora.sweep_cli import interrupted_line as sweep_interrupted_line
from fedlora.sweep_cli import sweep_command

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"
QUALITY = Quality(5.4, 221.4, None, 5.5, 244.7, None, {"site-0": {"loss": 5.5, "accuracy": None}})
LOCAL = Measured(Arm("local-only", QUALITY, 1792, 0, 22.3, 7 * 2**27), [CurvePoint(3, 221.4, 5.5)])


def _settings(*overrides: str) -> dict[str, object]:
    return compare_settings(load_config(TINY, list(overrides)), 10, None, None, None)


def _started(out: Path) -> ArmLedger:
    ledger = ArmLedger(out)
    ledger.check(_settings(), resume=False)
    ledger.record()
    return ledger


def test_an_arm_is_measured_once_and_read_back_as_it_was(tmp_path: Path) -> None:
    ledger = _started(tmp_path / "out")
    runs: list[str] = []

    def run() -> Measured:
        runs.append("local-only")
        return LOCAL

    assert ledger.measure("local-only", run) == LOCAL
    assert (tmp_path / "out" / ARMS_FOLDER / "local-only.json").is_file()
    resumed = ArmLedger(tmp_path / "out")
    resumed.check(_settings(), resume=True)
    assert resumed.measure("local-only", run) == LOCAL  # the same objects, not run again
    assert runs == ["local-only"]


def test_a_failed_start_writes_nothing(tmp_path: Path) -> None:
    """``check`` writes nothing; the settings are recorded only once model and data loaded."""
    ArmLedger(tmp_path / "out").check(_settings(), resume=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("prepare", "resume", "words"),
    [
        ("nothing", True, "does not exist, so there is nothing to resume; drop --resume"),
        ("other file", True, "holds no compare run, so there is nothing to resume"),
        ("other file", False, "is not empty; compare writes a fresh folder"),
        (
            "stopped compare",
            False,
            "holds an interrupted compare (finished: local-only); add --resume to finish it",
        ),
    ],
)
def test_folder_checks(tmp_path: Path, prepare: str, resume: bool, words: str) -> None:
    out = tmp_path / "out"
    if prepare == "other file":
        out.mkdir()
        (out / "old.txt").write_text("x")
    elif prepare == "stopped compare":
        _started(out).measure("local-only", lambda: LOCAL)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as error:
        ArmLedger(out).check(_settings(), resume=resume)
    assert words in str(error.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_resume_with_other_settings_names_the_key(tmp_path: Path) -> None:
    _started(tmp_path / "out")
    with pytest.raises(
        ConfigError, match=r"was compared with config\.train\.lr = 0\.003, not 0\.01"
    ):
        ArmLedger(tmp_path / "out").check(_settings("train.lr=0.01"), resume=True)
    stored = json.loads((tmp_path / "out" / SETTINGS_FILE).read_text())
    assert stored["config"]["train"]["lr"] == 0.003  # kept as it was


def test_compare_line_names_the_arm_what_is_kept_and_the_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _parser().parse_args(
        [
            "compare",
            str(TINY),
            "--out",
            str(out),
            "--set",
            "federation.rounds=2",
            "--arms",
            "local-only,centralized",
            "--full-lr",
            "5e-05",
        ]
    )
    command = compare_command(args)
    assert _parser().parse_args(command[1:]) == args  # the same command, option for option
    stop = RunInterrupted(signal.SIGINT)
    assert interrupted_line(stop, out, command) == (
        f"interrupted before any arm started; start it again: fedlora compare {TINY} --out {out} "
        "--set federation.rounds=2 --arms local-only,centralized --full-lr 5e-05"
    )
    ledger = _started(out)
    ledger.measure("local-only", lambda: LOCAL)
    ledger.phase = "during arm 'centralized'"
    line = interrupted_line(ledger.interrupted(stop), out, command)
    assert line.startswith(
        "interrupted during arm 'centralized' (finished: local-only; kept in "
        f"{out / ARMS_FOLDER}); resume with: fedlora compare {TINY} --out {out} --set"
    )
    assert line.endswith("--full-lr 5e-05 --resume")


def test_sweep_line_names_the_setting_and_the_finished_ones(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = _parser().parse_args(
        ["sweep", str(TINY), "--vary", "train.lr=0.01,0.1", "--out", str(out), "--tolerance", "2"]
    )
    command = sweep_command(args)
    assert _parser().parse_args(command[1:]) == args
    stop = RunInterrupted(signal.SIGTERM)
    assert sweep_interrupted_line(stop, out, command).startswith(
        "interrupted before any setting started; start it again: fedlora sweep"
    )
    first, second = out / "train.lr=0.01", out / "train.lr=0.1"
    _started(first)
    (first / "compare.md").write_text("# done\n")
    ledger = _started(second)
    ledger.phase = "during arm 'centralized'"
    assert sweep_interrupted_line(ledger.interrupted(stop), out, command) == (
        "interrupted in setting train.lr=0.1 during arm 'centralized' (settings finished: "
        "train.lr=0.01; each finished arm is kept); resume with: fedlora sweep "
        f"{TINY} --vary train.lr=0.01,0.1 --out {out} --tolerance 2.0 --resume"
    )
    assert isinstance(ledger.interrupted(stop), CompareInterrupted)
