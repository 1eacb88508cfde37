"""500 enroll/remove cycles through both ends, rules and listeners on (bench/soak.py): no fd
is left behind in either process. (10,000 cycles, and RSS, are bench/soak.py's by hand.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import ROOT

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_500_cycles_leave_no_fd_behind_in_either_process() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--cycles", "500", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report["cycles"] == 500
    for side in ("node_agent", "ztunnel"):
        assert report["after"][side]["fds"] == report["before"][side]["fds"], (side, report)
