"""What a site has released under DP, across runs: its epsilon does not restart with a new run.

``policy.max-epsilon`` bounds the privacy a site spends. Counted within one run only, a
coordinator could start a new run (a new run id, round 1 again) whenever a site's budget ran
out. So a site records, in its store (``<store>/privacy-ledger.json``, next to the roster
serial), each run it trained in under DP: per noise multiplier, the highest round number. Its
policy check composes every earlier run's releases with the current one
(``common.dp.composed_epsilon``). Conservative, as within a run: a run counts by its highest
round number, rounds the site sat out included. Light on imports: the per-message ClientApp
process of a deployed site uses it. Deleting the file forgets the site's spending: it is the
site's own record, kept like its keys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from common.atomic import write_bytes_atomic
from common.errors import UpdateRejected
from common.site_policy import Releases

PRIVACY_LEDGER_FILE = "privacy-ledger.json"


class PrivacyLedger:
    """One site's DP releases by run: in ``root`` (its store), or in memory when None."""

    def __init__(self, root: Path | None) -> None:
        self.path = None if root is None else Path(root) / PRIVACY_LEDGER_FILE
        self._runs: dict[str, dict[str, int]] = {}  # run id -> repr(multiplier) -> rounds

    def _load(self) -> dict[str, dict[str, int]]:
        if self.path is None or not self.path.exists():
            return self._runs
        try:
            runs = json.loads(self.path.read_text(encoding="utf-8"))["runs"]
            parsed = {
                str(run): {repr(_multiplier(m)): _rounds(r) for m, r in by_multiplier.items()}
                for run, by_multiplier in runs.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UpdateRejected(
                f"{self.path} should hold this site's DP releases by run "
                '({"runs": {run id: {noise multiplier: rounds}}}); it cannot be read, so the '
                "site cannot tell what it has spent"
            ) from None
        self._runs = parsed
        return parsed

    def earlier(self, run_id: str) -> Releases:
        """The releases of every run but ``run_id``, sorted."""
        return tuple(
            sorted(
                (float(multiplier), rounds)
                for run, by_multiplier in self._load().items()
                if run != run_id
                for multiplier, rounds in by_multiplier.items()
            )
        )

    def record(self, run_id: str, server_round: int, noise_multiplier: float) -> None:
        """Remember that run ``run_id`` released round ``server_round`` at this multiplier."""
        runs = self._load()
        by_multiplier = runs.setdefault(run_id, {})
        key = repr(_multiplier(noise_multiplier))
        if by_multiplier.get(key, 0) >= server_round:
            return
        by_multiplier[key] = _rounds(server_round)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"runs": runs}, indent=1, sort_keys=True) + "\n"
            write_bytes_atomic(self.path, text.encode())


def _multiplier(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or number <= 0:
        raise ValueError(value)
    return number


def _rounds(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value
