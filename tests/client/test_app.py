"""The Flower glue at a site: what a refusal tells the coordinator."""

from __future__ import annotations

from client.app import public_reason
from common.errors import ConfigError, DataError, UpdateRejected


def test_a_refusal_names_a_data_error_only_by_its_kind() -> None:
    """The reason a site sends the coordinator never quotes its rows or label values."""
    secret = "row 17: label 'hiv-positive' is not one of the 3 known labels (a, b, c)"
    reason = public_reason(DataError(secret))
    assert "hiv" not in reason and "row 17" not in reason and "data" in reason
    for exc in (ConfigError("train.lr: expected > 0"), UpdateRejected("stale version")):
        assert public_reason(exc) == str(exc)  # the coordinator's own mistakes stay readable
