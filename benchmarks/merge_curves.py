"""Draw the curves of arms taken from several ``fedlora compare`` runs in one picture.

A reference arm measured in a later run (for example a centralized arm with another lr, made
with ``compare --arms base,centralized``) replaces or joins the arms of an earlier run on the
same split, seeds and examples budget. Each ``--arm`` names ``RUN_FOLDER:ARM[=LABEL]``;
the picture is ``compare``'s own (``fedlora.compare_curves.plot_curves``), written to
``--out`` as ``curves-round.png`` and ``curves-bytes.png``, with the merged curves in
``curves.json``.

    python benchmarks/merge_curves.py --out DIR \\
        --arm benchmarks/out/compare-b77-path8:federated \\
        --arm "benchmarks/out/compare-b77-path8-central2e3:centralized=centralized (AdamW 2e-3)"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedlora.compare_curves import CurvePoint, Curves, curves_json, plot_curves


def read_arm(spec: str) -> tuple[str, list[CurvePoint]]:
    """``RUN_FOLDER:ARM[=LABEL]`` -> (label, the arm's curve from RUN_FOLDER/compare.json)."""
    folder, sep, rest = spec.rpartition(":")
    if not sep or not folder:
        raise SystemExit(f"--arm {spec!r}: expected RUN_FOLDER:ARM[=LABEL]")
    arm, _, label = rest.partition("=")
    path = Path(folder) / "compare.json"
    try:
        curves = json.loads(path.read_text(encoding="utf-8"))["curves"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"{path}: no compare curves ({exc})") from None
    if arm not in curves:
        raise SystemExit(f"{path}: no arm {arm!r}; it has {sorted(curves)}")
    points = [
        CurvePoint(p["round"], p["global"], p["own"], int(p.get("bytes") or 0)) for p in curves[arm]
    ]
    return label or arm, points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the pictures")
    parser.add_argument("--arm", action="append", required=True, help="RUN_FOLDER:ARM[=LABEL]")
    parser.add_argument("--causal-lm", action="store_true", help="perplexity, not accuracy")
    args = parser.parse_args()
    curves: Curves = dict(read_arm(spec) for spec in args.arm)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = plot_curves(curves, args.out, classification=not args.causal_lm)
    (args.out / "curves.json").write_text(json.dumps(curves_json(curves), indent=1) + "\n")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
