"""The fault matrix (``benchmarks/fault_matrix.py``), each case once through the same code: a
site that crashes before training or after uploading, a site slower than the round timeout, a
full disk while a version is written, and seven kinds of hostile reply in one round.

Each case is a simulation of ``examples/tiny.toml`` through the real apps;
``benchmarks/fault_cases.py`` holds the cases and their checks, these tests assert the checks
and the key counts. The slow site needs Ray's parallel sites and round timeout; the other cases
run on the in-process runtime (``IN_PROCESS``), where a site that raises is answered with an
error reply as Flower's Ray runtime answers it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Ray workers inherit sys.path: they import benchmarks/fault_inject.py by name.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fault_cases
from fault_cases import CaseResult
from fault_inject import HOSTILE_KINDS

from tests.helpers.in_process import IN_PROCESS

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def assert_ok(result: CaseResult) -> None:
    assert result.failed == [], (result.case, result.failed, result.details)
    assert result.lost == 0 and result.half_written == 0, result.details
    assert result.verdict == "ok"


def test_site_crash_before_training_round_goes_on_and_site_rejoins(tmp_path: Path) -> None:
    [result] = fault_cases.site_crash_before_training(tmp_path, [IN_PROCESS])
    assert_ok(result)
    assert (result.rounds_completed, result.published) == (2, 3)
    assert (result.accepted, result.rejected) == (2 + 3, 1)  # round 1 without site-1


def test_site_crash_after_upload_loses_nothing(tmp_path: Path) -> None:
    [result] = fault_cases.site_crash_after_upload(tmp_path, [IN_PROCESS])
    assert_ok(result)
    assert (result.rounds_completed, result.published) == (2, 3)
    assert (result.accepted, result.rejected) == (3 + 2, 1)  # its round-1 upload counts


def test_slow_site_is_left_out_and_its_late_reply_never_counts(tmp_path: Path) -> None:
    [result] = fault_cases.slow_site_beyond_timeout(tmp_path)
    assert_ok(result)
    assert (result.rounds_completed, result.published) == (2, 3)
    assert (result.accepted, result.rejected) == (2 + 3, 1)  # the rejection: no reply in time
    [missing] = result.details["round 1 rejected"]
    assert missing["reason"] == (
        f"no reply within federation.round-timeout = {fault_cases.SLOW_TIMEOUT:g} s"
    )


def test_disk_full_stops_the_run_cleanly_and_resume_completes_it(tmp_path: Path) -> None:
    stopped, resumed = fault_cases.disk_full_while_publishing(tmp_path, [IN_PROCESS])
    assert_ok(stopped)
    assert "No space left on device" in stopped.details["error"]
    assert (stopped.rounds_completed, stopped.published) == (1, 2)
    assert_ok(resumed)
    assert (resumed.rounds_completed, resumed.published) == (3, 4)


def test_every_hostile_reply_is_rejected_and_the_round_aggregates_the_rest(
    tmp_path: Path,
) -> None:
    [result] = fault_cases.hostile_replies(tmp_path, [IN_PROCESS])
    assert_ok(result)
    rows = result.details["hostile rows"]
    assert [row[0] for row in rows] == list(HOSTILE_KINDS)
    assert all(row[3] == "yes" for row in rows), rows
    assert (result.accepted, result.rejected) == (9 + 2, len(HOSTILE_KINDS))
    assert result.published == 3
