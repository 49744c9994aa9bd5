"""The fault matrix: what a federation does when a site crashes, stalls or lies, or the disk fills.

Runs every simulation-level case of ``fault_cases`` (each a real Flower simulation of
``examples/tiny.toml``, one at a time), prints the matrix and the hostile-reply table, and
writes ``benchmarks/out/fault_matrix.json`` with every check behind each verdict.

    python benchmarks/fault_matrix.py [--work DIR] [--cases a c e]

The coordinator cases (SIGKILL mid-run, two coordinators on one folder, SuperLink restart) are
covered by the tests listed in ``COVERED_ELSEWHERE`` and not rerun here. Targets: every verdict
ok, versions lost 0, half-written versions visible 0.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_output import header, print_table, write_result
from fault_cases import CASES, HOSTILE_COLUMNS, MATRIX_COLUMNS, CaseResult

COVERED_ELSEWHERE = [
    [
        "coordinator SIGKILL during round 2 training / after publishing v0002, then --resume",
        "tests/test_resume.py::test_sigkill_then_resume_is_bit_identical",
    ],
    [
        "coordinator (SuperLink + ServerApp) SIGKILL in round 2, restart resubmits the run",
        "tests/test_e2e_resilience.py::test_coordinator_sigkill_in_round_2_resumes_bit_identical",
    ],
    [
        "site (SuperNode) SIGKILL mid-round, rejoins the next round",
        "tests/test_e2e_resilience.py::test_site_killed_mid_round_rejoins_next_round",
    ],
    [
        "two coordinators on one run folder",
        "tests/server/test_rundir.py::test_second_coordinator_is_refused, "
        "::test_lock_held_by_another_process_is_refused_and_dies_with_it",
    ],
]


def excerpt(reason: str, width: int = 80) -> str:
    """A rejection reason shortened for a table: long tensor names cut to their tail."""
    short = re.sub(r"'[\w.]*?(\w+_proj\.lora_[AB]\.weight)'", r"'…\1'", reason)
    short = short.splitlines()[-1] if short else short  # a site's traceback: its last line
    return short if len(short) <= width else short[: width - 1] + "…"


def hostile_rows(results: list[CaseResult]) -> list[list[Any]]:
    rows = [r.details["hostile rows"] for r in results if "hostile rows" in r.details]
    return [[*row[:4], excerpt(row[4]), row[5]] for table in rows for row in table]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--work", type=Path, help="run folders go here (default: a temp dir)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    args = parser.parse_args()
    result = header("fault_matrix")
    work = args.work or Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    results: list[CaseResult] = []
    seconds: dict[str, float] = {}
    for letter in args.cases:
        case = CASES[letter]
        shutil.rmtree(work / letter, ignore_errors=True)
        start = time.perf_counter()
        results += case(work / letter)
        seconds[letter] = round(time.perf_counter() - start, 1)

    print_table("Fault matrix", MATRIX_COLUMNS, [r.row() for r in results])
    hostile = hostile_rows(results)
    if hostile:
        print_table("Hostile replies (one round, 9 sites)", HOSTILE_COLUMNS, hostile)
    print_table("Covered by other tests (not rerun)", ["case", "test"], COVERED_ELSEWHERE)
    for r in results:
        for name in r.failed:
            print(f"FAILED CHECK {r.case}: {name}")
    result |= {
        "work": str(work),
        "seconds_per_case": seconds,
        "matrix_columns": MATRIX_COLUMNS,
        "matrix": [r.row() for r in results],
        "hostile_columns": HOSTILE_COLUMNS,
        "hostile": hostile,
        "checks": {r.case: r.checks for r in results},
        "details": {r.case: r.details for r in results},
        "covered_elsewhere": COVERED_ELSEWHERE,
    }
    write_result("fault_matrix", result)
    return 0 if all(r.verdict == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
