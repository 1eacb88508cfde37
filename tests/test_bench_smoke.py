"""The side-by-side bench keeps working: a smoke run (N=20, zds only) makes well-formed
results, and the upstream peers, absent here as in CI, are skipped and said to be.
No timing is asserted: timings are what ``bench/`` records, not what tests check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.root


def test_a_smoke_run_makes_well_formed_results_and_says_which_peers_it_skipped(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "sidebyside.py"),
            "--smoke",
            "--pairs",
            "istio,zds",
            "--peers",
            str(tmp_path / "no-peers-here"),
            "--out",
            str(out),
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "Istio server + Istio fake ztunnel: skipped, istio-zds-server, istio-zds-client not built"
        in done.stderr
    )

    doc = json.loads((out / "sidebyside.json").read_text())
    assert doc["command"].endswith("--no-plots") and "--smoke" in doc["command"]
    assert {"os", "kernel", "cpus", "python", "zds_commit"} <= set(doc["machine"])
    assert len(doc["load_start"]) == 3 and len(doc["load_end"]) == 3
    assert doc["pairs"] == {"zds": "zds server + zds ztunnel (uvloop)"}
    assert any("istio-zds-server" in line for line in doc["skipped"])
    timed = [r for r in doc["results"] if r["run"] >= 1]
    assert {(r["mode"], r["listeners"]) for r in timed} == {
        ("snapshot", True),
        ("snapshot", False),
        ("live", True),
        ("live", False),
    }
    for r in timed:
        assert (r["pair"], r["n"]) == ("zds", 20)
        assert r["wall_ms"] > 0 and 0 < r["acked_ms"]["p50"] <= r["acked_ms"]["max"]
        assert r["rss_kb"]["server"]["VmRSS"] > 0 and r["rss_kb"]["ztunnel"]["VmRSS"] > 0
        assert r["fds"]["ztunnel"] >= (7 * 20 if r["listeners"] else 0)
        assert ("hello_ms" in r) == (r["mode"] == "snapshot")
        assert ("first_enrolled_ms" in r) == (r["mode"] == "live")
    assert {(s["mode"], s["n"], s["pair"]) for s in doc["summary"]} == {
        ("snapshot", 20, "zds"),
        ("live", 20, "zds"),
    }
    assert all(s["ratio"] is None for s in doc["summary"])  # no Istio pair to compare with
    assert {t["target"] for t in doc["targets"]} >= {
        "zds ztunnel: exec to hello (ms, median)",
        "zds pod add, N=20: exec to first request (ms, median)",
    }
    # zds pod add's start-up, timed against the stand-in: every pod of the file answered.
    assert [(r["n"], r["run"]) for r in doc["first_request"]] == [(20, 1)]
    assert 0 < doc["first_request"][0]["first_request_ms"] < doc["first_request"][0]["exit_ms"]

    table = (out / "sidebyside.md").read_text()
    assert "| bench | N | listeners | zds server + zds ztunnel (uvloop) |" in table
    assert "| snapshot | 20 | on |" in table and "| live | 20 | off |" in table
    assert "skipped, istio-zds-server" in table
    assert "| N | exec to first request |" in table and "\n| 20 | " in table
