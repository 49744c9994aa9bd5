"""``fedlora compare`` kept arm by arm, so that an interrupted compare goes on where it stopped.

``DIR/compare-settings.json`` records what the arms' results depend on (the config and the
compare options, not ``--arms``); each finished arm is written to ``DIR/arms/<arm>.json`` (its
row, curve and details) as soon as it is measured. A first Ctrl-C or SIGTERM stops the arm
that runs (the federated run through ``fedlora.simulate``'s own clean stop) and
``CompareInterrupted`` says which it was; ``compare --resume`` on the folder checks the
settings, takes the finished arms from disk, resumes the federated run from its last
checkpoint and runs the arms that are left. ``fedlora sweep --resume`` does the same per
setting.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atomic import write_json_atomic
from common.errors import ConfigError
from fedlora.compare_arms import ARMS
from fedlora.interrupt import RunInterrupted

if TYPE_CHECKING:  # torch and matplotlib: this module is imported before they are loaded
    from common.config import RunConfig, TrainConfig
    from fedlora.compare_curves import CurvePoint
    from fedlora.compare_measures import Arm

SETTINGS_FILE = "compare-settings.json"
ARMS_FOLDER = "arms"


@dataclass(frozen=True)
class Measured:
    """One arm's result: its row (None: skipped, see ``details``), its curve (None: an arm
    that is evaluated once) and what else it reports."""

    arm: Arm | None
    curve: list[CurvePoint] | None = None
    details: dict[str, Any] = field(default_factory=dict)


def measured_json(measured: Measured) -> dict[str, Any]:
    arm, curve = measured.arm, measured.curve
    return {
        "arm": None if arm is None else asdict(arm),
        "curve": None if curve is None else [asdict(point) for point in curve],
        "details": measured.details,
    }


def measured_from_json(raw: Mapping[str, Any]) -> Measured:
    from fedlora.compare_curves import CurvePoint
    from fedlora.compare_measures import Arm, Quality

    arm = raw["arm"]
    if arm is not None:
        arm = Arm(**{**arm, "quality": Quality(**arm["quality"])})
    curve = raw["curve"]
    points = None if curve is None else [CurvePoint(**point) for point in curve]
    return Measured(arm, points, dict(raw["details"]))


class CompareInterrupted(RunInterrupted):
    """The first SIGINT or SIGTERM stopped ``fedlora compare`` in ``out`` during ``phase``
    (``during arm 'centralized'``, ``while writing the tables``, ...)."""

    def __init__(self, signum: int, out: Path, phase: str) -> None:
        super().__init__(signum)
        self.out = out
        self.phase = phase


def compare_settings(
    cfg: RunConfig,
    curve_points: int,
    personalize_steps: int | None,
    reference: TrainConfig | None,
    full_lr: float | None,
) -> dict[str, Any]:
    """What the arms' results depend on: a resumed compare must be given the same."""
    return {
        "config": cfg.model_dump(mode="json", by_alias=True),
        "curve_points": curve_points,
        "personalize_steps": personalize_steps,
        "reference": None if reference is None else reference.model_dump(mode="json"),
        "full_lr": full_lr,
    }


def _first_difference(stored: Any, now: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key whose value differs between two JSON values, with both values."""
    if isinstance(stored, dict) and isinstance(now, dict):
        for name in sorted(set(stored) | set(now)):
            found = _first_difference(stored.get(name), now.get(name), f"{key}{name}.")
            if found is not None:
                return found
        return None
    return None if stored == now else (key.rstrip("."), stored, now)


def finished_arms(out: Path) -> list[str]:
    """The arms measured in ``out``, in the table's order."""
    return [name for name in ARMS if (out / ARMS_FOLDER / f"{name}.json").is_file()]


class ArmLedger:
    """The finished arms of one compare run in ``out``, and the phase that runs now."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.phase = "while loading the model and data"
        self._settings: dict[str, Any] = {}

    def check(self, settings: Mapping[str, Any], resume: bool) -> None:
        """Check ``out`` against ``resume`` and, on resume, the recorded ``settings``.

        Writes nothing: ``record`` does, once the model and data loaded, so that a refused or
        failed start leaves ``out`` as it was.
        """
        recorded = self.out / SETTINGS_FILE
        self._settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
        if resume:
            if not recorded.is_file():
                what = "does not exist" if not self.out.exists() else "holds no compare run"
                raise ConfigError(f"--out {self.out} {what}, so there is nothing to resume; "
                                  "drop --resume")  # fmt: skip
            stored = json.loads(recorded.read_text(encoding="utf-8"))
            found = _first_difference(stored, self._settings)
            if found is not None:
                key, was, now = found
                raise ConfigError(
                    f"--resume: {self.out} was compared with {key} = {was!r}, not {now!r}; "
                    "resume with the same config and options, or choose another folder"
                )
            return
        if recorded.is_file():
            done = ", ".join(finished_arms(self.out)) or "no arm yet"
            raise ConfigError(f"--out {self.out} holds an interrupted compare (finished: {done}); "
                              "add --resume to finish it, or choose another folder")  # fmt: skip
        if self.out.exists() and any(self.out.iterdir()):
            raise ConfigError(f"--out {self.out} is not empty; compare writes a fresh folder")

    def record(self) -> None:
        """Record the checked settings in ``out`` (kept as they are on resume)."""
        recorded = self.out / SETTINGS_FILE
        if not recorded.is_file():
            write_json_atomic(recorded, self._settings)
        self.phase = "between arms"

    def measure(self, name: str, run: Callable[[], Measured]) -> Measured:
        """``name``'s result from disk where an earlier run finished it, else ``run()``'s,
        written to disk before it is returned."""
        path = self.out / ARMS_FOLDER / f"{name}.json"
        if path.is_file():
            print(f"{name}: measured by the interrupted run, taken from {path}")
            return measured_from_json(json.loads(path.read_text(encoding="utf-8")))
        self.phase = f"during arm {name!r}"
        measured = run()
        write_json_atomic(path, measured_json(measured))
        self.phase = "between arms"
        return measured

    def interrupted(self, stop: RunInterrupted) -> CompareInterrupted:
        return CompareInterrupted(stop.signum, self.out, self.phase)


def phase_of(stop: RunInterrupted) -> str:
    """What the stopped compare was doing (``during arm 'federated' after its round 2``)."""
    if not isinstance(stop, CompareInterrupted):
        return "before the first arm"
    if stop.phase != "during arm 'federated'":
        return stop.phase
    from server.metrics import read_metrics  # imports Flower, loaded by then anyway

    folder = stop.out / "federated"
    rounds = [line["round"] for line in read_metrics(folder)] if folder.is_dir() else []
    return stop.phase + (f" after its round {max(rounds)}" if rounds else "")


def interrupted_line(stop: RunInterrupted, out: Path, command: Sequence[str]) -> str:
    """One line: where compare in ``out`` stopped, what is kept, and the command that goes on
    (``command`` is the interrupted one, without ``--resume``)."""
    if not (out / SETTINGS_FILE).is_file():
        return f"interrupted before any arm started; start it again: {shlex.join(command)}"
    done = ", ".join(finished_arms(out)) or "no arm yet"
    return (
        f"interrupted {phase_of(stop)} (finished: {done}; kept in {out / ARMS_FOLDER}); "
        f"resume with: {shlex.join([*command, '--resume'])}"
    )
