"""The quick-start demo as `make demo` runs it: SmolLM2-135M on the dolly slice, 3 sites.

The slowest test (a few minutes on 2 cores); it checks the promise the README makes: every
site's held-out perplexity ends below the untouched base model's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.registry import Registry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_demo_improves_every_site(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "demo", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "round 3" in result.stdout and "step 6/6" in result.stdout  # progress was shown
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    base, final = rounds[0]["sites"], rounds[-1]["sites"]
    assert sorted(base) == ["site-0", "site-1", "site-2"]
    for site in base:
        assert final[site]["evaluate"]["eval_loss"] < base[site]["evaluate"]["eval_loss"], site
    assert all(r["rejected"] == [] for r in rounds)
    assert Registry(out / "registry").latest("shared").version == 3  # type: ignore[union-attr]
