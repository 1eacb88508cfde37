"""The side-by-side bench keeps working: a smoke run (N=20, zds only) makes well-formed
results, and the upstream peers, absent here as in CI, are skipped and said to be.
No timing is asserted: timings are what ``bench/`` records, not what tests check."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import ROOT, stop_cleanly, wait_until
from zds.netns.fixtures import list_netns

pytestmark = pytest.mark.root


def test_a_smoke_run_makes_well_formed_results_and_says_which_peers_it_skipped(tmp_path: Path) -> None:
    out = tmp_path / "results"
    others = set(busy_besides())  # (another bench's, running beside the suite: not this one's)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "sidebyside.py"),
            "--smoke",
            "--pairs",
            "istio,zds,zds-dns",
            "--peers",
            str(tmp_path / "no-peers-here"),
            "--out",
            str(out),
            "--no-plots",
            "--busy-beside",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert not set(busy_besides()) - others, "the process kept busy beside the bench outlived it"
    assert (
        "Istio server + Istio fake ztunnel: skipped, istio-zds-server, istio-zds-client not built"
        in done.stderr
    )

    doc = json.loads((out / "sidebyside.json").read_text())
    assert doc["command"].endswith("--no-plots --busy-beside 30") and "--smoke" in doc["command"]
    assert {"os", "kernel", "cpus", "python", "zds_commit"} <= set(doc["machine"])
    assert len(doc["load_start"]) == 3 and len(doc["load_end"]) == 3
    assert doc["config"]["busy_beside_pct"] == 30
    assert doc["pairs"] == {
        "zds": "zds server + zds ztunnel (uvloop)",
        "zds-dns": "zds server + zds ztunnel (uvloop, DNS forwarder on)",
    }
    assert any("istio-zds-server" in line for line in doc["skipped"])
    timed = [r for r in doc["results"] if r["run"] >= 1]
    assert {(r["mode"], r["listeners"]) for r in timed} == {
        ("snapshot", True),
        ("snapshot", False),
        ("live", True),
        ("live", False),
    }
    for r in timed:
        assert r["pair"] in ("zds", "zds-dns") and r["n"] == 20
        assert r["wall_ms"] > 0 and 0 < r["acked_ms"]["p50"] <= r["acked_ms"]["max"]
        assert r["rss_kb"]["server"]["VmRSS"] > 0 and r["rss_kb"]["ztunnel"]["VmRSS"] > 0
        # With listeners the peers' 3 TCP ones a pod (the bench's zds: --no-dns), and the DNS
        # forwarder's 4 sockets more with it; a pod's netns fd is the node agent's, not counted.
        sockets = (7 if r["pair"] == "zds-dns" else 3) if r["listeners"] else 0
        assert sockets * 20 <= r["fds"]["ztunnel"] < (sockets + 1) * 20 + 64, r["fds"]
        assert ("hello_ms" in r) == (r["mode"] == "snapshot")
        assert ("first_enrolled_ms" in r) == (r["mode"] == "live")
        # The CPU of the timed section: the ztunnel side's whole start-up in a snapshot, zds pod
        # add's in a live run (tens of ms each: never 0 ticks); the steal, a share.
        cpu = r["cpu_ms"]
        assert set(cpu) == ({"server", "ztunnel", "client"} if r["mode"] == "live" else {"server", "ztunnel"})
        assert min(cpu.values()) >= 0 and cpu["client" if r["mode"] == "live" else "ztunnel"] > 0, cpu
        assert r["steal_pct"] is None or 0 <= r["steal_pct"] <= 100
    assert {(s["mode"], s["n"], s["pair"]) for s in doc["summary"]} == {
        (mode, 20, pair) for mode in ("snapshot", "live") for pair in ("zds", "zds-dns")
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
    assert (
        "| bench | N | listeners | zds server + zds ztunnel (uvloop) "
        "| zds server + zds ztunnel (uvloop, DNS forwarder on) |" in table
    )
    assert "| snapshot | 20 | on |" in table and "| live | 20 | off |" in table
    assert "skipped, istio-zds-server" in table
    assert "| N | exec to first request |" in table and "\n| 20 | " in table
    assert "| bench | N | listeners | pair | node agent | ztunnel side | `zds pod add` | steal % |" in table
    assert "| live | 20 | on | zds server + zds ztunnel (uvloop) | " in table
    assert "Beside it: another process keeping one CPU busy 30% of the time (`--busy-beside`)" in table


def busy_besides() -> list[int]:
    """The processes ``--busy-beside`` starts (``procs._BUSY``) that are running."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"share, period, bench = " in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


#: The bench scripts' zds is this checkout's (not whichever the venv's editable install names).
THIS_CHECKOUT = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_bench_arguments_it_cannot_use_are_refused_in_one_line() -> None:
    """0 pods hung enroll.py (a semaphore of 0) or crashed sidebyside.py's report; a mode it
    does not know was timed as live."""
    for script, args, says in (
        ("enroll.py", ["-n", "0"], "argument -n: 0 is not a positive integer (at most 2147483647)"),
        (
            "enroll.py",
            ["--window", "0"],
            "argument --window: 0 is not a positive integer (at most 2147483647)",
        ),
        ("sidebyside.py", ["--sizes", "0"], "--sizes 0: expected pod counts from 1, comma-separated"),
        ("sidebyside.py", ["--modes", "live,bogus"], "--modes live,bogus: expected some of snapshot,live"),
        ("sidebyside.py", ["--listeners", "onn"], "--listeners onn: expected some of on,off"),
        (
            "sidebyside.py",
            ["--busy-beside", "101"],
            "argument --busy-beside: '101' is not a percentage from 0 to 100",
        ),
        (
            "sidebyside.py",
            ["--runs", "0"],
            "argument --runs: 0 is not a positive integer (at most 2147483647)",
        ),
        ("soak.py", ["--pods", "0"], "argument --pods: 0 is not a positive integer (at most 2147483647)"),
        ("flood.py", ["--runs", "-1"], "argument --runs: -1 is not a positive integer (at most 2147483647)"),
        ("hello.py", ["--runs", "0"], "argument --runs: 0 is not a positive integer (at most 2147483647)"),
        ("hello.py", [str(ROOT), str(ROOT)], "a checkout is named twice"),
        (
            "hello.py",
            ["/nonexistent"],
            "argument checkouts: /nonexistent: not a zds checkout (no zds/__main__.py)",
        ),
    ):
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / script), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=THIS_CHECKOUT,
        )
        assert done.returncode == 2 and done.stderr.strip().endswith(says), (script, args, done.stderr)


def test_the_hello_bench_times_this_checkout_and_leaves_nothing() -> None:
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "zds-hello-*")))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hello.py"), "--runs", "2", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        env=THIS_CHECKOUT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{ROOT}: exec to hello, median "), done.stdout
    assert lines[0].endswith("; 2 runs)"), done.stdout
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "zds-hello-*"))) == before


def test_the_hello_bench_says_at_once_when_a_checkouts_zds_exits_before_its_hello(tmp_path: Path) -> None:
    (tmp_path / "zds").mkdir()
    (tmp_path / "zds" / "__init__.py").write_text("")
    (tmp_path / "zds" / "__main__.py").write_text('import sys\nsys.exit("zds: it breaks at start")\n')
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hello.py"), "--runs", "1", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=20,  # (not the 30 s a missing hello is waited for)
        env=THIS_CHECKOUT,
    )
    assert (done.returncode, done.stderr) == (
        1,
        f"bench/hello.py: {tmp_path}: zds ztunnel exited 1 before its hello: zds: it breaks at start\n",
    )


def test_a_bench_stopped_by_sigterm_removes_its_processes_namespaces_and_temp_dir() -> None:
    """SIGTERM (timeout, kill, a cancelled CI job) left the node agent and the ztunnel side
    running under pid 1, the pods' namespaces and the temp dir: only Ctrl-C ran the clean-up."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "enroll.py"), "-n", "300", "-m", "proto", "--rules", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=THIS_CHECKOUT,
    )
    prefix = f"zdsbench-{proc.pid}-"
    temp_dirs = set(glob.glob(os.path.join(tempfile.gettempdir(), "zds-bench-*")))
    try:
        # Its servers started: children of it (their pids), its namespaces made.
        wait_until(lambda: len(children(proc.pid)) == 2 or proc.poll() is not None, "the bench's servers")
        started = children(proc.pid)
        assert any(name.startswith(prefix) for name in list_netns())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop_cleanly(proc)
    assert proc.returncode == 143, err
    assert err.endswith("bench/enroll.py: stopped by SIGTERM; cleaned up\n"), err
    assert not [name for name in list_netns() if name.startswith(prefix)]
    assert not [pid for pid in started if os.path.exists(f"/proc/{pid}")]
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "zds-bench-*"))) == temp_dirs


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def test_the_steal_share_is_read_from_its_own_column_over_the_cpu_time_that_went_by(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/proc/stat's ``cpu`` line: user, nice, system, idle, iowait, irq, softirq, steal, guest,
    guest_nice (the last two counted in user and nice already): the steal share is the steal
    column's growth over that of the first eight, whatever the others did."""
    from bench import procs

    lines = iter([[100, 5, 50, 800, 3, 1, 2, 10, 40, 7], [150, 5, 70, 900, 3, 1, 2, 30, 90, 7]])
    monkeypatch.setattr(procs, "_cpu_fields", lambda: next(lines))
    assert procs.Steal().percent() == round(100 * 20 / 190, 1)
