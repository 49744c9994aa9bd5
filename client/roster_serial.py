"""The newest signed roster a site has accepted: refuse an older one (roster freshness).

The enrollment authority numbers each roster it signs (``common.roster``: ``serial``). A
coordinator relays the roster in every secure-sum instruction; one that relayed an older roster
(for example one from before a site's key was rotated, whose old key the coordinator may have
obtained) could make sites accept a key that is no longer enrolled. So a site remembers the
highest serial it has accepted, across runs, in its store (``<store>/roster-serial``), and
refuses a lower one. Light on imports: the per-message ClientApp process of a deployed site
uses it.
"""

from __future__ import annotations

from pathlib import Path

from common.atomic import write_bytes_atomic
from common.errors import UpdateRejected

ROSTER_SERIAL_FILE = "roster-serial"


class RosterSerial:
    """The highest roster serial accepted at one site: in ``root`` (its store), or in memory."""

    def __init__(self, root: Path | None) -> None:
        self.path = None if root is None else Path(root) / ROSTER_SERIAL_FILE
        self._highest = 0

    def highest(self) -> int:
        """The highest serial accepted so far (0: none)."""
        if self.path is not None and self.path.exists():
            text = self.path.read_text().strip()
            if not text.isdigit():
                raise UpdateRejected(
                    f"{self.path} should hold the highest roster serial this site accepted, "
                    f"as a number; it holds {text[:40]!r}"
                )
            self._highest = max(self._highest, int(text))
        return self._highest

    def check(self, serial: int) -> None:
        """Refuse roster ``serial`` if a higher one was accepted before; remember nothing.

        Raises
        ------
        UpdateRejected
            ``serial`` is below the highest accepted: the coordinator relays an old roster.
        """
        highest = self.highest()
        if serial < highest:
            raise UpdateRejected(
                f"the coordinator relays roster serial {serial}, but this site has accepted "
                f"serial {highest}: an older roster may name keys that are no longer enrolled"
            )

    def accept(self, serial: int) -> None:
        """``check`` roster ``serial``, then remember it if it is the highest so far."""
        self.check(serial)
        if serial > self._highest:
            self._highest = serial
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(self.path, f"{serial}\n".encode())
