"""Every error zds raises on purpose is a ZdsError (zds/errors.py), the bulk lane's and the
in-pod rules' too."""

from __future__ import annotations

import pytest

from zds.errors import ZdsError
from zds.server.bulkwire import LaneError, LaneUnsupported
from zds.server.podrules import RulesError


@pytest.mark.parametrize("error", [LaneError, LaneUnsupported, RulesError])
def test_the_error_is_a_zds_error(error: type[Exception]) -> None:
    assert issubclass(error, ZdsError)


def test_a_rules_error_keeps_its_message_and_whether_it_was_undone() -> None:
    error = RulesError("iptables-restore: line 3 failed", undone=False)
    assert (str(error), error.undone) == ("iptables-restore: line 3 failed", False)
