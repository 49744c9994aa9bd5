"""The highest roster serial a site has accepted (``client.roster_serial``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.roster_serial import ROSTER_SERIAL_FILE, RosterSerial
from common.errors import UpdateRejected


@pytest.mark.parametrize("on_disk", [True, False])
def test_an_older_serial_is_refused_after_a_newer_one(tmp_path: Path, on_disk: bool) -> None:
    seen = RosterSerial(tmp_path if on_disk else None)
    seen.accept(2)
    seen.accept(2)  # the same roster again: every stage of a round relays it
    seen.accept(3)
    with pytest.raises(UpdateRejected, match=r"relays roster serial 2.*accepted serial 3"):
        seen.accept(2)
    assert seen.highest() == 3


def test_the_highest_serial_survives_a_restart_of_the_site(tmp_path: Path) -> None:
    RosterSerial(tmp_path).accept(5)
    assert (tmp_path / ROSTER_SERIAL_FILE).read_text() == "5\n"
    with pytest.raises(UpdateRejected, match="accepted serial 5"):
        RosterSerial(tmp_path).accept(4)  # a new process (a deployed site's next ClientApp)


def test_a_damaged_serial_file_is_named(tmp_path: Path) -> None:
    (tmp_path / ROSTER_SERIAL_FILE).write_text("two\n")
    with pytest.raises(UpdateRejected, match=f"{ROSTER_SERIAL_FILE} should hold"):
        RosterSerial(tmp_path).accept(3)


def test_check_refuses_an_older_serial_and_remembers_nothing(tmp_path: Path) -> None:
    """``check`` runs before a site acts on an instruction; only ``accept`` (after it acted)
    writes, so an instruction refused for another reason leaves the store as it was."""
    seen = RosterSerial(tmp_path)
    seen.accept(3)
    with pytest.raises(UpdateRejected, match="relays roster serial 2"):
        seen.check(2)
    seen.check(7)  # newer: fine, but not remembered
    assert (tmp_path / ROSTER_SERIAL_FILE).read_text() == "3\n"
    assert RosterSerial(tmp_path).highest() == 3
