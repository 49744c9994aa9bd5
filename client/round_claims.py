"""One masked input per (run, round): the secure-sum redo rule, kept on the site's disk.

Secure sum hides a site's delta inside a sum. If the site sent two masked inputs of the same
delta for one round, and the coordinator unmasked them under two different survivor sets (a
round redone after a crash, or a coordinator that only says it redoes one), the two sums would
differ by what reveals the delta. So a site claims each (run, round) once, before it sends its
masked input, and refuses a second claim: a redone round gets nothing from it (the round then
fails or goes on without it, and the next round is new).

The claim is a file created with ``O_EXCL`` (``<run store>/secure-sum/round-<n>``), so it
survives restarts of the site and two processes cannot both win it. Light on imports: the
per-message ClientApp process of a deployed site uses it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from common.atomic import fsync_dir
from common.errors import UpdateRejected

CLAIMS_FOLDER = "secure-sum"
# A run id names a folder: the coordinator's are 32 hex digits; nothing that could climb out.
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a plain folder name, else ``UpdateRejected``."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise UpdateRejected(f"run id {str(run_id)[:80]!r} is not a plain name (A-Z a-z 0-9 _ -)")
    return run_id


def _already(server_round: int) -> UpdateRejected:
    return UpdateRejected(
        f"this site already sent a masked input for round {server_round} of this run; it sends "
        "nothing for a redone round (two masked inputs under different survivor sets would "
        "reveal its delta)"
    )


def claim(run_root: Path | None, server_round: int, memory: set[int]) -> None:
    """Claim ``server_round`` of the run whose store is ``run_root`` (``memory`` if None).

    Raises
    ------
    UpdateRejected
        The round was claimed before.
    """
    server_round = int(server_round)
    if run_root is None:
        if server_round in memory:
            raise _already(server_round)
        memory.add(server_round)
        return
    folder = Path(run_root) / CLAIMS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / f"round-{server_round}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise _already(server_round) from None
    os.close(fd)
    fsync_dir(folder)
