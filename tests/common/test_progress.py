"""The round progress line: durations, elapsed time and the ETA from the mean round time."""

from __future__ import annotations

import pytest

from common import progress
from common.progress import RoundClock, format_duration, round_progress


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.4, "0s"),
        (42.0, "42s"),
        (59.4, "59s"),
        (59.6, "1m00s"),
        (185.0, "3m05s"),
        (3599.0, "59m59s"),
        (3600.0, "1h00m"),
        (7620.0, "2h07m"),
        (-3.0, "0s"),  # a clock step backwards is not a negative duration
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_eta_is_the_mean_round_time_times_the_rounds_left() -> None:
    assert round_progress(3, 20, 65.0, 20.0) == "round 3/20, elapsed 1m05s, ETA 5m40s"


def test_no_eta_before_a_round_is_timed_and_zero_after_the_last() -> None:
    assert round_progress(0, 5, 12.0, None) == "round 0/5, elapsed 12s, ETA -"
    assert round_progress(5, 5, 100.0, None) == "round 5/5, elapsed 1m40s, ETA 0s"
    assert round_progress(5, 5, 100.0, 20.0) == "round 5/5, elapsed 1m40s, ETA 0s"


def test_round_clock_leaves_untimed_rounds_out_of_the_mean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines: list[str] = []
    monkeypatch.setattr(progress, "print_message", lines.append)
    now = iter([1000.0, 1030.0, 1040.0, 1060.0])
    clock = RoundClock(total=4, now=lambda: next(now))
    clock.round_done(0, None)  # the initial evaluation: no training, not in the mean
    clock.round_done(1, 10.0)
    clock.round_done(2, 20.0)
    assert lines == [
        "round 0/4, elapsed 30s, ETA -",
        "round 1/4, elapsed 40s, ETA 30s",
        "round 2/4, elapsed 1m00s, ETA 30s",
    ]
