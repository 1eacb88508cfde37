"""`zds demo` runs the whole story, exits 0, and leaves nothing behind, also when interrupted."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.harness import ZDS, free_subnets, run_unique, stop_cleanly, wait_until
from zds.demo.remains import RECORD
from zds.netns.fixtures import list_netns
from zds.runtime import process_started

pytestmark = pytest.mark.root


def leftovers() -> list[str]:
    found = [name for name in list_netns() if name.startswith("zdsdemo-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    found += [line.split(":")[1].strip() for line in links.splitlines() if "zdsdemo" in line]
    return found


def pids_in(output: str) -> list[int]:
    """The processes the demo started, as it introduces them ("   pid 8642, ZDS socket ...");
    not the pids its narrated log lines mention ("ztunnel connected from pid 8653")."""
    return [int(p) for p in re.findall(r"^\s+pid (\d+),", output, re.M)]


def alive(pid: int) -> bool:
    """Running: a zombie (a child whose parent died, not reaped yet) is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_demo_tells_the_whole_story_and_cleans_up() -> None:
    done = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for text in (
        "received hello from ztunnel",
        "snapshot sent to ztunnel",
        "productpage: acked by ztunnel connection",
        "listening on 15001 15006 15008",
        "host netns   none of them",
        "REDIRECT --to-ports 15001",
        "got the same 1060 bytes back",
        "productpage outbound (15001): 1 connection(s)",
        "reviews inbound (15006):      1 connection(s)",
        "ztunnel acked del",
        "rules removed from every pod",
        "nothing left behind",
    ):
        assert text in out, f"{text!r} missing from the demo's output:\n{out}"
    # Each step shows its own log lines (the node agent writes them in batches).
    enrolling = out[out.index("4. Enrolling") : out.index("5. ")]
    removing = out[out.index("8. Removing") : out.index("9. ")]
    assert re.search(r"ztunnel acked add in [\d.]+ ms  uid=demo-ratings", enrolling), enrolling
    assert re.search(r"ztunnel acked del in [\d.]+ ms  uid=demo-ratings", removing), removing
    assert "uid=demo-ratings" not in out[out.index("5. ") : out.index("8. Removing")]
    assert leftovers() == []
    pids = pids_in(out)
    assert len(pids) == 2 and not any(alive(p) for p in pids)


def interrupted_at(step: str, *signals: int) -> tuple[int, str]:
    """Run the demo and send ``signals`` (10 ms apart) once a line starts with ``step``:
    its exit code and everything it printed."""
    proc = subprocess.Popen(
        [*ZDS, "demo", "--no-color"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if line.startswith(step) or not line:
                break
        if not seen[-1].startswith(step):
            pytest.fail(f"the demo never reached {step!r}:\n" + "".join(seen))
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.01)  # pacing: signals a person sends one after another, not synchronisation
        rest, _ = proc.communicate(timeout=60)
    finally:
        stop_cleanly(proc, signal.SIGINT)  # (a failure above: it cleans up as on Ctrl-C)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_in_the_middle_still_cleans_up(sig: int) -> None:
    # (SIGHUP: the terminal or ssh session went away; it killed the demo where it stood)
    code, out = interrupted_at("4. Enrolling", sig)
    assert code == 128 + sig, out  # as a shell says a process the signal killed (it said 130 for each)
    assert ("interrupted" if sig == signal.SIGINT else "stopped by SIGHUP") + "; cleaned up" in out, out
    wait_until(lambda: leftovers() == [], timeout=10, what="the demo's namespaces and bridge to go")
    assert not any(alive(p) for p in pids_in(out))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_the_clean_up_waits_for_its_end(sig: int) -> None:
    """Interrupted as its clean-up began, the demo said "interrupted; cleaned up" and left its
    node agent running for good, holding its sockets and the pods' namespaces. The clean-up
    now runs to its end first; the interrupt is then reported as before."""
    code, out = interrupted_at("9. Cleaning up", sig, sig)  # twice, as an impatient user does
    assert code == 128 + sig, out
    assert ("interrupted" if sig == signal.SIGINT else "stopped by SIGTERM") + "; cleaned up" in out, out
    assert "Traceback" not in out
    pids = pids_in(out)
    assert len(pids) == 2
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10, what="the demo's children gone")
    assert leftovers() == []


def test_a_second_demo_while_one_runs_says_so_and_touches_nothing() -> None:
    """The second took the first one's namespaces for an earlier run's leftovers and said to
    delete them (which would break the first). It says another demo runs, exits 1, and the
    first one ends as always."""
    first = subprocess.Popen(
        [*ZDS, "demo", "--no-color"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert first.stdout is not None
    try:
        seen = [first.stdout.readline()]
        while seen[-1] and not seen[-1].startswith("2. "):  # its pods are made
            seen.append(first.stdout.readline())
        assert seen[-1], "".join(seen)
        second = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stderr == "zds demo: another zds demo is running on this machine; wait for it to end\n"
        assert "remove them" not in second.stdout + second.stderr and "Cleaning up" not in second.stdout
        rest, _ = first.communicate(timeout=120)
    finally:
        stop_cleanly(first, signal.SIGINT)  # (a failure above: it cleans up as on Ctrl-C)
    assert first.returncode == 0, "".join(seen) + rest
    assert leftovers() == []


@dataclasses.dataclass
class Enrolling:
    """A demo at its step 4 (its pods made and wired, both children running)."""

    proc: subprocess.Popen[str]
    pids: list[int]
    tmp_before: set[str]


@pytest.fixture
def enrolling() -> Iterator[Enrolling]:
    """A demo once both its children run; whatever it and the test leave is removed afterwards
    (by PID: the demo and its children), also when the test fails."""
    tmp_before = set(glob.glob("/tmp/zds-demo-*"))
    proc = subprocess.Popen(
        [*ZDS, "demo", "--no-color"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        while not seen or (seen[-1] and not seen[-1].startswith("4. ")):  # both children run
            seen.append(proc.stdout.readline())
        pids = pids_in("".join(seen))
        assert len(pids) == 2, "".join(seen)
        yield Enrolling(proc, pids, tmp_before)
    finally:
        clean_after_killed(proc, pids, tmp_before)


@pytest.fixture
def killed(enrolling: Enrolling) -> set[str]:
    """That demo SIGKILLed, its children gone with it: the demo temp directories there were
    before it."""
    enrolling.proc.kill()
    enrolling.proc.wait(10)
    wait_until(
        lambda: not any(alive(p) for p in enrolling.pids), timeout=20, what="the demo's children to stop"
    )
    return enrolling.tmp_before


def clean_after_killed(proc: subprocess.Popen[str], pids: list[int], tmp_before: set[str]) -> None:
    """What a killed demo's test leaves, removed whatever failed (by PID: the demo's children)."""
    stop_cleanly(proc, signal.SIGKILL)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # (the children's own stop, if it never came)
        for pid in filter(alive, pids):
            os.kill(pid, sig)
        deadline = time.monotonic() + 20
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
    names = [name for name in list_netns() if name.startswith("zdsdemo-")]
    subprocess.run([*ZDS, "netns", "delete", "--bridge", "zdsdemo0", *names], capture_output=True)
    subprocess.run(["ip", "link", "del", "zdsdemo0"], capture_output=True)
    for tmp in set(glob.glob("/tmp/zds-demo-*")) - tmp_before:
        shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(RECORD)


def test_a_killed_demo_takes_its_children_with_it_and_the_next_demo_removes_what_it_left(
    killed: set[str],
) -> None:
    """SIGKILL leaves the demo no time to stop its children (each in a session of its own): they
    served on, holding their sockets and the pods' namespaces, until found by hand. They are
    sent SIGTERM as the demo dies. Its namespaces, bridge and temp directory stayed, and the next
    demo refused to start until they were removed by hand; it removes them itself now, as the
    killed demo's record names them, says so, and runs."""
    [tmp] = set(glob.glob("/tmp/zds-demo-*")) - killed  # what it left
    assert os.path.exists(RECORD)
    again = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (
        "   removed what an earlier demo that did not end left: zdsdemo-productpage, zdsdemo-ratings, "
        f"zdsdemo-reviews, bridge zdsdemo0, {tmp}\n"
    ) in again.stdout, again.stdout
    assert leftovers() == [] and not os.path.exists(tmp) and not os.path.exists(RECORD)
    assert set(glob.glob("/tmp/zds-demo-*")) == killed


def test_a_namespace_of_the_demos_names_it_did_not_make_is_never_removed(killed: set[str]) -> None:
    """Only what the killed demo's record proves it made goes: a namespace made since under
    one of its names (another identity) stays, and the next demo names the command instead."""
    for argv in (["delete", "zdsdemo-reviews"], ["create", "zdsdemo-reviews"]):  # someone else's now
        subprocess.run([*ZDS, "netns", *argv], check=True, capture_output=True)
    theirs = os.stat("/var/run/netns/zdsdemo-reviews").st_ino
    again = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 1, again.stdout + again.stderr
    assert again.stderr == (
        "zds demo: namespaces from an earlier demo exist: zdsdemo-reviews; "
        "remove them with: zds netns delete --bridge zdsdemo0 zdsdemo-reviews\n"
    )
    assert "removed what an earlier demo that did not end left: zdsdemo-productpage, zdsdemo-ratings, " in (
        again.stdout
    )
    assert [n for n in list_netns() if n.startswith("zdsdemo-")] == ["zdsdemo-reviews"]
    assert os.stat("/var/run/netns/zdsdemo-reviews").st_ino == theirs


def test_a_killed_demo_not_reaped_yet_is_gone_and_a_record_it_was_writing_goes_too(
    enrolling: Enrolling,
) -> None:
    """A killed demo its parent had not reaped yet (a zombie) was taken for one that still runs,
    and a record it was killed writing (RECORD.PID) stayed for good."""
    partial = f"{RECORD}.{2**22 + 1}"  # (no process has that pid: above the largest pid_max)
    with open(partial, "w") as f:
        f.write('{"pid": ')
    try:
        os.kill(enrolling.proc.pid, signal.SIGKILL)  # (not reaped: a zombie until the clean-up)
        wait_until(lambda: not alive(enrolling.proc.pid), timeout=10, what="the demo to die")
        again = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "removed what an earlier demo that did not end left: zdsdemo-productpage" in again.stdout
        assert not os.path.exists(partial) and leftovers() == []
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def test_a_name_a_killed_demo_made_and_did_not_mount_yet_goes_too() -> None:
    """Killed between a pod namespace's name (an empty file) and its mount, a demo left an empty
    entry its record names, and the next one refused for good (the record gone by then)."""
    entry = "/var/run/netns/zdsdemo-reviews"
    with open(RECORD, "w") as record:
        json.dump(
            {"pid": 2**22 + 1, "started": 1, "tmp": None, "keep_logs": False, "bridge": None}
            | {"netns": {"zdsdemo-reviews": [4, 4026531840, 1]}},
            record,
        )
    open(entry, "x").close()
    try:
        done = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (
            "removed what an earlier demo that did not end left: zdsdemo-reviews (an empty entry)\n"
            in done.stdout
        )
        assert leftovers() == [] and not os.path.exists(RECORD)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RECORD)
        subprocess.run([*ZDS, "netns", "delete", "--missing-ok", "zdsdemo-reviews"], capture_output=True)


def test_a_record_it_cannot_write_is_said_in_one_line_before_anything_is_made() -> None:
    """A record that could not be written ended the demo in a traceback and left its half-written
    file beside it."""
    os.mkdir(RECORD)  # (a directory where the record goes: it cannot be replaced by a file)
    try:
        done = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr == (
            f"zds demo: cannot write its record of what it makes, {RECORD}: Is a directory\n"
        ), done.stderr
        assert leftovers() == [] and not glob.glob(f"{RECORD}.*")
    finally:
        os.rmdir(RECORD)


def test_a_bridge_of_the_demos_name_the_dead_demo_did_not_make_stays() -> None:
    """A dead demo's record took any unused zds bridge of the demo's name for its own, also one
    a user made with zds netns; only the recorded link goes, and this one stays."""
    subnets = free_subnets()
    pod = run_unique("zrv")
    made = [*ZDS, "netns", "create", "--bridge", "zdsdemo0", "--subnet4", subnets.v4, "--subnet6", subnets.v6]
    subprocess.run([*made, pod], check=True, capture_output=True)
    try:
        subprocess.run([*ZDS, "netns", "delete", pod], check=True, capture_output=True)  # (the bridge stays)
        with open(RECORD, "w") as record:  # a demo that died before it made anything
            json.dump(
                {
                    "pid": 2**22 + 1,
                    "started": 1,
                    "tmp": "/tmp/zds-demo-gone",
                    "keep_logs": False,
                    "netns": {},
                    "bridge": None,
                },
                record,
            )
        done = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "bridge zdsdemo0 exists already" in done.stderr, done.stderr
        assert "removed what" not in done.stdout and not os.path.exists(RECORD)
        assert "zdsdemo0" in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    finally:
        subprocess.run([*ZDS, "netns", "delete", "--missing-ok", pod], capture_output=True)
        subprocess.run(["ip", "link", "del", "zdsdemo0"], capture_output=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RECORD)


@pytest.mark.parametrize("garbled", ["[" * 200_000, '{"pid": "1"}', "", "not json"])
def test_a_garbled_record_is_not_trusted_and_not_a_traceback(garbled: str) -> None:
    with open(RECORD, "w") as record:
        record.write(garbled)
    try:
        done = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "removed what" not in done.stdout and not os.path.exists(RECORD) and leftovers() == []
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RECORD)


def test_pod_subnets_this_host_uses_are_refused_in_one_line_and_others_can_be_given() -> None:
    """The demo's fixed subnets, in use on this host, were refused with "pick another
    (--subnet4)": a flag the demo did not have. It has now; the refusal leaves nothing."""
    link = run_unique("zdt")[:15]
    subprocess.run(["ip", "link", "add", link, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.177.77.9/32", "dev", link], check=True)
        refused = subprocess.run([*ZDS, "demo", "--no-color"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert refused.stderr.endswith(
            f"zds demo: the pod subnet 10.177.77.0/24 is in use on this host (10.177.77.9 on {link});"
            " pick another (--subnet4)\n"
        ), refused.stderr
        assert leftovers() == []
        subnets = free_subnets()
        done = subprocess.run(
            [*ZDS, "demo", "--no-color", "--subnet4", subnets.v4, "--subnet6", subnets.v6],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"productpage -> reviews {subnets.ip4(3)}:9080" in done.stdout, done.stdout
        assert leftovers() == []
    finally:
        subprocess.run(["ip", "link", "del", link], check=True)


def test_a_process_whose_name_is_not_utf8_is_still_told_apart_by_its_start() -> None:
    """Its /proc/PID/stat read as text was a UnicodeDecodeError, taken for "no such process":
    a recorded process of the demo's would not have been ended."""
    code = "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'z\\xff', 0, 0, 0); print(1, flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
        with open(f"/proc/{proc.pid}/comm", "rb") as comm:
            assert comm.read() == b"z\xff\n"
        assert isinstance(process_started(proc.pid), int)
    finally:
        proc.kill()
        proc.wait()
