"""Run mutmut on a small seeded sample of mutants and fail on an unexplained survivor.

The whole mutation run (``make mutate``) takes too long for every CI run; this one runs a fixed
sample of mutants drawn with a fixed seed, round robin over the modules listed in
``[tool.mutmut] only_mutate`` (pyproject.toml), so that each module is represented. It exits 1
when a sampled mutant survives (or has no covering test) without an entry in
``tests/mutation_equivalents.txt``, and writes the sample's report to
``benchmarks/out/mutate-sample.md``.

Usage::

    python scripts/mutate_sample.py [--count 24] [--seed 20] [--max-children 2]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

import mutate_report

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def mutated_modules(pyproject: Path = Path("pyproject.toml")) -> list[Path]:
    """The files mutmut mutates (``only_mutate``); plain paths only, no globs."""
    config = tomllib.loads(pyproject.read_text("utf-8"))["tool"]["mutmut"]
    return [Path(p) for p in config["only_mutate"]]


def mutant_names(path: Path) -> list[str]:
    """The names mutmut gives the mutants of one file, without running anything."""
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    mutated = mutate_file_contents(str(path), path.read_text("utf-8"))
    return [get_mutant_name(path, name) for name in mutated.mutant_names]


def draw_sample(names_by_module: list[list[str]], count: int, seed: int) -> list[str]:
    """``count`` names, drawn round robin over the modules, each module's order seeded."""
    rng = random.Random(seed)
    queues = [rng.sample(names, len(names)) for names in names_by_module]
    sample: list[str] = []
    while len(sample) < count and any(queues):
        for queue in queues:
            if queue and len(sample) < count:
                sample.append(queue.pop())
    return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/mutate-sample.md"))
    args = parser.parse_args(argv)
    modules = mutated_modules()
    sample = draw_sample([mutant_names(p) for p in modules], args.count, args.seed)
    print(f"{len(sample)} mutants from {len(modules)} modules (seed {args.seed})", flush=True)
    run = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
    # mutmut's progress spinner is noise in a CI log; its exit code says whether it ran.
    done = subprocess.run([*run, *sample], stdout=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        print(f"mutmut run failed (exit {done.returncode}); rerun it by hand to see why")
        return done.returncode
    return mutate_report.main(["--check", "--out", str(args.out), "--only", *sample])


if __name__ == "__main__":
    sys.exit(main())
