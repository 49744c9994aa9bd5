"""What every benchmark script shares: the machine line, a plain-text table, the JSON file.

Each script in ``benchmarks/`` prints its table and writes ``benchmarks/out/<name>.json`` with
the date, the machine, the exact command and the figures, so that RESULTS.md can quote them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "benchmarks" / "out"


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    """Architecture, CPU, cores, memory (GiB) and library versions of this run."""
    import torch

    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "arch": platform.machine(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count() or 1,
        "memory_gib": round(pages / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # Other work on a 2-core machine moves every timing: note how busy it was.
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def header(name: str) -> dict[str, Any]:
    """The fields every result file opens with; call it when the benchmark starts."""
    return {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
    }


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A left-aligned text table with a title line; floats as given (format them first)."""
    cells = [[str(c) for c in columns]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def write_result(name: str, result: dict[str, Any], out_dir: Path = OUT_DIR) -> Path:
    """Write ``result`` as ``<out_dir>/<name>.json`` and say where."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return path


def rss_bytes() -> int:
    """Resident set size of this process now (bytes), from /proc/self/statm."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Clock:
    """Accumulated wall and CPU seconds (CPU: every thread of this process).

    On a shared machine the wall time of a step grows with the load while its CPU time
    barely moves, so both are reported.
    """

    wall: float = 0.0
    cpu: float = 0.0

    @contextmanager
    def running(self) -> Iterator[None]:
        """Add the time spent in the ``with`` block."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu


def run_simulate(config: Path, out: Path, overrides: list[str], timeout: float, log: Path) -> float:
    """Run ``fedlora simulate CONFIG`` as a subprocess (output to ``log``); its wall seconds."""
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", str(config), "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        subprocess.run(
            cmd, check=True, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout
        )
    return time.perf_counter() - start


def read_rounds(out: Path) -> list[dict[str, Any]]:
    """The per-round lines of a run folder's ``metrics.jsonl``."""
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def trained_rounds(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All rounds and the trained ones (round >= 1) of a run; RuntimeError if none trained.

    A run in which no site's reply was ever accepted says why (the first rejection), since
    its timings would measure nothing.
    """
    rounds = read_rounds(out)
    trained = [r for r in rounds if r["round"] >= 1]
    if not trained:
        raise RuntimeError(f"{out}: no trained round in metrics.jsonl")
    if not any(r["cohort"] for r in trained):
        reasons = [x.get("reason", "") for r in rounds for x in r.get("rejected", [])]
        first = reasons[0][:400] if reasons else "no reply recorded"
        raise RuntimeError(f"{out}: no site's reply was accepted in any round; first: {first}")
    return rounds, trained
