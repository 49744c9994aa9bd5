"""Turn mutmut's results into the mutation report: score per module, and every surviving mutant.

mutmut (``make mutate``, configured under ``[tool.mutmut]`` in pyproject.toml) leaves one
``mutants/<module>.py.meta`` per mutated module, mapping each mutant's name to the exit code of
its test run. This script reads those files (run it from the repository root, after mutmut) and
writes a Markdown report: per module the mutants killed, timed out, survived and left with no
covering test, the score, and the diff of each mutant that was not killed, with its reason from
the explained-equivalents file where it has one.

An *explained equivalent* is a mutant that no test can kill because it changes no observable
behaviour (or only behaviour the project deliberately leaves open). Each line of
``tests/mutation_equivalents.txt`` is ``<mutant name> <one-line reason>``; ``#`` starts a
comment. Mutant names carry a number that shifts when the function is edited, so an entry that
names no current mutant is listed in the report as stale.

Usage::

    python scripts/mutate_report.py [--out benchmarks/MUTATION.md] [--check]
        [--only NAME ...]

``--check`` exits 1 when a mutant survived (or had no test) without an explanation; ``--only``
restricts the report and the check to the named mutants (the seeded sample).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

EQUIVALENTS = Path("tests/mutation_equivalents.txt")
MUTANTS = Path("mutants")

# mutmut's exit-code classes (mutmut/stats.py, status_by_exit_code), folded into the four the
# report counts. A timeout counts as killed (the mutant made the tests hang or spin: a test
# noticed), as mutmut's own score does; anything else (segfault, suspicious) is shown apart.
_KILLED = {1, 3}
_SURVIVED = {0}
_NO_TESTS = {5, 33}
_TIMEOUT = {24, -24, 36, 152, 255}
_NOT_CHECKED = {None}


def status_of(exit_code: int | None) -> str:
    """The report's class of a mutant from the exit code mutmut recorded for it."""
    if exit_code in _KILLED:
        return "killed"
    if exit_code in _SURVIVED:
        return "survived"
    if exit_code in _NO_TESTS:
        return "no tests"
    if exit_code in _TIMEOUT:
        return "timeout"
    if exit_code in _NOT_CHECKED:
        return "not checked"
    return "other"


@dataclass(frozen=True)
class Mutant:
    """One mutant: its module's source path, its mutmut name and what its test run gave."""

    path: Path
    name: str
    status: str


def read_results(mutants_dir: Path = MUTANTS) -> list[Mutant]:
    """Every mutant recorded under ``mutants_dir``, from its module's ``.py.meta`` file."""
    found = []
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        source = meta.relative_to(mutants_dir).with_suffix("")
        codes = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
        found += [Mutant(source, name, status_of(code)) for name, code in codes.items()]
    return found


def read_equivalents(path: Path = EQUIVALENTS) -> dict[str, str]:
    """Mutant name -> the reason it is an equivalent, from the explained-equivalents file."""
    reasons: dict[str, str] = {}
    if not path.exists():
        return reasons
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}:{number}: {name!r} has no reason; write one after the name")
        reasons[name] = reason.strip()
    return reasons


def unexplained(mutants: Iterable[Mutant], reasons: dict[str, str]) -> list[Mutant]:
    """The mutants that no test killed and that the equivalents file does not explain."""
    return [m for m in mutants if m.status in ("survived", "no tests") and m.name not in reasons]


def score(counts: Counter[str]) -> float:
    """Percent of checked mutants killed (timeouts count as killed); 0 when none was checked."""
    caught = counts["killed"] + counts["timeout"]
    checked = caught + counts["survived"] + counts["no tests"]
    return 100.0 * caught / checked if checked else 0.0


def _diff(mutant: Mutant) -> str:
    # mutmut's own diff (original function against the mutant's), read from mutants/.
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    return get_diff_for_mutant(mutant.name, path=mutant.path)


def render(mutants: list[Mutant], reasons: dict[str, str], known: set[str]) -> str:
    """The Markdown report: a table of scores per module, then each mutant not killed.

    ``known`` holds every mutant name mutmut recorded (not only the reported ones): an
    equivalents entry outside it is stale.
    """
    by_module: dict[Path, list[Mutant]] = {}
    for m in mutants:
        by_module.setdefault(m.path, []).append(m)
    total: Counter[str] = Counter(m.status for m in mutants)
    lines = [
        "# Mutation report",
        "",
        "Written by `scripts/mutate_report.py` from mutmut's results (`make mutate`). Score:",
        "(killed + timeout) / (killed + timeout + survived + no tests).",
        "",
        "| module | mutants | killed | timeout | survived | no tests | explained | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path, group in [*by_module.items(), (Path("all"), mutants)]:
        counts = Counter(m.status for m in group)
        explained = sum(1 for m in group if m.name in reasons and m.status != "killed")
        lines.append(
            f"| `{path}` | {len(group)} | {counts['killed']} | {counts['timeout']} |"
            f" {counts['survived']} | {counts['no tests']} | {explained} |"
            f" {score(counts):.1f} % |"
        )
    stale = sorted(set(reasons) - known)
    lines += ["", f"Not checked or other: {total['not checked'] + total['other']}.", ""]
    for m in mutants:
        if m.status in ("killed", "timeout"):
            continue
        verdict = f"explained: {reasons[m.name]}" if m.name in reasons else "**unexplained**"
        lines += [f"## `{m.name}`: {m.status}", "", verdict, "", "```diff", _diff(m), "```", ""]
    if stale:
        lines += ["## Stale entries in the equivalents file", ""]
        lines += [f"- `{name}`" for name in stale] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/MUTATION.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 on unexplained survivors")
    parser.add_argument("--only", nargs="*", default=None, help="restrict to these mutants")
    args = parser.parse_args(argv)
    mutants = read_results()
    known = {m.name for m in mutants}
    if args.only is not None:
        wanted = set(args.only)
        mutants = [m for m in mutants if m.name in wanted]
    reasons = read_equivalents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(mutants, reasons, known), "utf-8")
    missing = unexplained(mutants, reasons)
    counts = Counter(m.status for m in mutants)
    print(f"{len(mutants)} mutants, score {score(counts):.1f} %: {dict(counts)}; report {args.out}")
    for m in missing:
        print(f"unexplained {m.status}: {m.name}")
    return 1 if args.check and missing else 0


if __name__ == "__main__":
    sys.exit(main())
