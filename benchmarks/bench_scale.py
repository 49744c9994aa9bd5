"""What a sampled round of a large federation costs against a small one (issue 14, "scale").

Runs ``fedlora simulate`` on the banking77 example (MiniLM-L6, pathological label skew) twice,
as subprocesses on this machine:

- ``small``: ``--baseline-sites`` sites (10), every site trains every round (fraction 1.0);
- ``large``: ``--sites`` sites (100), ``federation.fraction-train`` and ``fraction-evaluate``
  = ``--fraction`` (0.1): the same number of sites train per round as in ``small``.

Per arm it reports the mean wall seconds of a trained round (``metrics.jsonl``), the seconds
until round 0 was recorded (start-up: model loads, and in ``large`` the identify query to
every site), the peak resident memory of the whole process tree (the coordinator and every
Ray worker, sampled every 0.5 s from /proc), and the largest single process (the OS's
``ru_maxrss`` of the children). The target is that a ``large`` round costs no more than a
``small`` one.

    python benchmarks/bench_scale.py                       # 2 rounds each (a smoke run)
    python benchmarks/bench_scale.py --rounds 5 --sites 300
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench_output import (
    REPO,
    header,
    print_table,
    read_rounds,
    run_simulate,
    write_result,
)

CONFIG = REPO / "examples" / "banking77.toml"
NAME = "scale"


def _tree_rss_bytes(root: int) -> int:
    """Resident bytes of ``root`` and every descendant process, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            resident = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # it ended meanwhile
            continue
        parents[int(entry.name)] = int(stat[1])
        rss[int(entry.name)] = resident * page
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree)


class TreeMemory:
    """Samples this process tree's resident memory every ``interval`` seconds; keeps the peak."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_arm(
    name: str, sites: int, fraction: float, rounds: int, work: Path, timeout: float
) -> dict[str, Any]:
    """One ``fedlora simulate`` run; its per-round time and memory figures."""
    out = work / name
    overrides = [
        f"federation.sites={sites}",
        f"federation.rounds={rounds}",
        f"federation.fraction-train={fraction}",
        f"federation.fraction-evaluate={fraction}",
    ]
    with TreeMemory() as memory:
        wall = run_simulate(CONFIG, out, overrides, timeout, work / f"{name}.log")
    rounds_seen = read_rounds(out)
    trained = [r for r in rounds_seen if r["round"] >= 1 and "failed" not in r]
    if not trained:
        raise RuntimeError(f"{name}: no round trained; see {work / f'{name}.log'}")
    return {
        "sites": sites,
        "fraction": fraction,
        "rounds": rounds,
        "trained_per_round": [len(r["cohort"]) for r in trained],
        "round_seconds": [r["seconds"] for r in trained],
        "round_seconds_mean": sum(r["seconds"] for r in trained) / len(trained),
        "wall_seconds": wall,
        "startup_seconds": wall - sum(r["seconds"] for r in rounds_seen if r["round"] >= 1),
        "peak_tree_rss_bytes": memory.peak,
        "overrides": overrides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--baseline-sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    args = parser.parse_args()
    result = header(NAME)
    result["config"] = str(CONFIG.relative_to(REPO))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        work = Path(scratch)
        result["small"] = run_arm(
            "small", args.baseline_sites, 1.0, args.rounds, work, args.timeout
        )
        result["large"] = run_arm(
            "large", args.sites, args.fraction, args.rounds, work, args.timeout
        )
    # ru_maxrss (KiB on Linux): the largest single child process over both runs.
    result["largest_process_rss_bytes"] = (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    )
    mib = 2**20
    rows = [
        [
            f"{arm['sites']} sites x {arm['fraction']:g}",
            f"{sum(arm['trained_per_round']) / len(arm['trained_per_round']):.1f}",
            f"{arm['round_seconds_mean']:.1f}",
            f"{arm['startup_seconds']:.1f}",
            f"{arm['peak_tree_rss_bytes'] / mib:,.0f}",
        ]
        for arm in (result["small"], result["large"])
    ]
    ratio = result["large"]["round_seconds_mean"] / result["small"]["round_seconds_mean"]
    result["large_over_small_round_seconds"] = ratio
    print_table(
        f"scale: banking77, MiniLM-L6, {args.rounds} rounds; large round / small round = "
        f"{ratio:.2f}",
        ["arm", "trained / round", "round s (mean)", "start-up s", "peak tree RSS MiB"],
        rows,
    )
    write_result(NAME, result)


if __name__ == "__main__":
    main()
