"""``zds check node-agent`` against zds's own node agent, both ways: every check holds against
``zds server``, and every check fails, with the right finding, against ``zds server`` with the
matching fault armed (``--faults FILE``) — so no check can hold vacuously."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

from tests.harness import ZDS, CheckRun, NodeAgentProc, Pod, StartServer, faults_file, wait_until, zds_check
from zds.check.agentchecks import CHECKS

pytestmark = pytest.mark.root

#: Short waits: zds server answers at once; only the ack-deadline scenario waits a deadline.
FAST = ["--timeout", "3", "--grace", "1", "--hello-wait", "0.5", "--cycles", "5"]


def check_args(server: NodeAgentProc, *extra: str) -> list[str]:
    return ["--zds-socket", server.zds_socket, "--control-socket", server.control_socket, *FAST, *extra]


#: The node agent's ack deadline in the runs that must pass: the exchange scenario holds an ack
#: for half of it (a second), and a loaded machine may add to that before the ack arrives.
ACK_DEADLINE = "2"


def test_every_check_holds_against_zds_server(start_server: StartServer, tmp_path: pathlib.Path) -> None:
    server = start_server("--ack-timeout", ACK_DEADLINE)
    junit = tmp_path / "report.xml"
    run = zds_check(
        "node-agent", *check_args(server, "--ack-deadline", ACK_DEADLINE, "--junit", str(junit)), tmp=tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert set(run.statuses().values()) == {"pass"}, run.stdout
    assert [c["name"] for c in run.report["checks"]] == [c.name for c in CHECKS]
    assert "0 failed, 0 errors, 0 skipped" in run.stdout
    assert junit.read_text().count("<testcase") == len(CHECKS)
    assert 'failures="0"' in junit.read_text()


def test_pods_come_and_go_through_command_templates(
    start_server: StartServer, tmp_path: pathlib.Path
) -> None:
    server = start_server("--ack-timeout", ACK_DEADLINE)
    zds = f"{sys.executable} -m zds"
    add = (
        f"{zds} pod add --uid {{uid}} --name {{name}} --namespace {{namespace}} "
        f"--service-account {{service_account}} --netns {{netns}} --control-socket {server.control_socket}"
    )
    remove = f"{zds} pod remove --uid {{uid}} --control-socket {server.control_socket}"
    run = zds_check(
        "node-agent",
        "--zds-socket",
        server.zds_socket,
        "--add-cmd",
        add,
        "--remove-cmd",
        remove,
        "--ack-deadline",
        ACK_DEADLINE,
        *FAST,
        tmp=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert set(run.statuses().values()) == {"pass"}, run.stdout
    assert "pods via --add-cmd" in run.stdout


def test_an_agent_that_takes_pods_after_its_add_command_returns_passes_with_settle(
    start_server: StartServer, tmp_path: pathlib.Path
) -> None:
    """An agent that learns pods asynchronously (an informer, a queue): its add command returns
    before the agent has the pod. The snapshot scenario connects as the adds return, so it
    finds them missing, and says to give --settle; with --settle it waits, and passes."""
    server = start_server("--ack-timeout", ACK_DEADLINE)
    pids = tmp_path / "late-adds.pids"
    zds = f"{sys.executable} -m zds"
    # The pod reaches the agent 4 s after the command returned (in the background): the early
    # run's snapshot is judged well before (0.5 s of hello wait), the settled one well after.
    add = (
        f"(sleep 4; {zds} pod add --uid {{uid}} --name {{name}} --namespace {{namespace}} "
        f"--service-account {{service_account}} --netns {{netns}} --control-socket {server.control_socket}) "
        f">/dev/null 2>&1 & echo $! >> {pids}"
    )
    remove = f"{zds} pod remove --uid {{uid}} --control-socket {server.control_socket}"
    args = ["--zds-socket", server.zds_socket, "--add-cmd", add, "--remove-cmd", remove, *FAST]
    args += ["--only", "snapshot-complete"]
    try:
        early = zds_check("node-agent", *args, tmp=tmp_path)
        assert early.returncode == 1, early.stdout + early.stderr
        assert early.statuses() == {"snapshot-complete": "fail"}, early.stdout
        assert (
            "is not in the snapshot; if the node agent takes a pod after its add command returns"
            in early.stdout
        )
        settled = zds_check("node-agent", *args, "--settle", "10", tmp=tmp_path)
        assert settled.returncode == 0, settled.stdout + settled.stderr
        assert settled.statuses() == {"snapshot-complete": "pass"}, settled.stdout
    finally:
        _end_started(pids)


def _end_started(pids: pathlib.Path) -> None:
    """Wait for the background adds the check's commands started, and kill (by pid) any left."""
    started = [int(line) for line in pids.read_text().split()] if pids.exists() else []
    assert started, "the add command never ran"
    try:
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in started), "the late adds", 30)
    finally:
        for pid in started:
            if os.path.exists(f"/proc/{pid}"):
                subprocess.run(["pkill", "-KILL", "-P", str(pid)], check=False)  # (its sleep or zds)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def pod_entry(pod: Pod) -> dict[str, str]:
    return {"uid": "held-" + pod.name, "name": "held", "namespace": "zds-check", "netns": pod.path}


#: check -> (fault entries for zds server --faults, extra server flags, extra check flags, what the finding says)
PROOFS: dict[str, tuple[list[dict[str, Any]], list[str], list[str], str]] = {
    "hello-first": ([{"kind": "record-before-hello"}], [], [], "arrived before ztunnel's hello"),
    # On the exchange's live Add, whose ack the check holds back.
    "one-in-flight": (
        [{"kind": "pipeline", "skip_connections": 1, "after_snapshot": True}],
        [],
        [],
        "was not acked yet",
    ),
    "record-size": ([{"kind": "oversize-record"}], [], [], "is 1125 bytes"),
    "strict-decoding": (
        [{"kind": "unknown-field"}],
        [],
        [],
        "fields ztunnel does not know: WorkloadRequest field 15",
    ),
    "canonical-encoding": ([{"kind": "non-canonical"}], [], [], "is not in canonical form"),
    "no-empty-record": ([{"kind": "empty-record"}], [], [], "a 0-byte record"),
    "add-one-fd": ([{"kind": "add-without-fd"}], [], [], "carried 0 fds"),
    "fd-is-netns": (
        [{"kind": "not-a-netns-fd"}],
        [],
        [],
        "not a network namespace: not a namespace /dev/null",
    ),
    "add-netns-is-the-pods": (
        [{"kind": "wrong-netns", "skip_connections": 1}],
        [],
        [],
        "not the pod's own netns",
    ),
    "fd-only-on-add": ([{"kind": "fd-on-del"}], [], [], "carried 1 fd(s); only AddWorkload may"),
    "add-workload-info": ([{"kind": "add-without-workload-info"}], [], [], "has no workload_info"),
    # On the exchange's connection (the second): it lives on after its snapshot, to see what follows.
    "no-keep-after-snapshot": (
        [{"kind": "keep-unknown-uid", "after_snapshot": True, "skip_connections": 1}],
        [],
        [],
        "after SnapshotSent",
    ),
    "one-snapshot-sent": (
        [{"kind": "second-snapshot-sent", "skip_connections": 1}],
        [],
        [],
        "a second SnapshotSent on this connection",
    ),
    "snapshot-complete": (
        [{"kind": "withhold-snapshot-sent", "skip_connections": 1}],
        [],
        [],
        "no SnapshotSent within",
    ),
    "reconnect-snapshot": (
        [{"kind": "withhold-snapshot-sent", "skip_connections": 2}],
        [],
        [],
        "no SnapshotSent within",
    ),
    "adds-to-newest": ([{"kind": "add-to-oldest"}], [], [], "arrived on the older connection"),
    "deletes-to-all": ([{"kind": "del-to-newest-only"}], [], [], "no DelWorkload for"),
    # No fault needed: a node agent whose deadline is longer than the one checked for.
    "ack-deadline": ([], ["--ack-timeout", "30"], ["--ack-deadline", "1"], "no deadline"),
    "fd-hygiene": ([{"kind": "leak-netns-fds", "count": 5}], [], [], "on the netns of removed pods"),
}


def test_every_check_has_a_proof_that_it_can_fail() -> None:
    assert set(PROOFS) == {c.name for c in CHECKS}


@pytest.mark.parametrize("name", sorted(PROOFS))
def test_each_check_fails_against_zds_server_with_the_matching_fault(
    name: str, start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    entries, server_flags, check_flags, says = PROOFS[name]
    held = make_pod()  # a pod the node agent holds from the start (record faults take its netns)
    pods = tmp_path / "pods.jsonl"
    pods.write_text(json.dumps(pod_entry(held)) + "\n")
    flags = ["--pods", str(pods), *server_flags]
    if entries:
        flags += ["--faults", faults_file(tmp_path / "faults.jsonl", *entries)]
    server = start_server(*flags)
    run = zds_check("node-agent", *check_args(server, "--only", name, *check_flags), tmp=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.status(name) == "fail", run.stdout
    assert says in run.findings(name), run.stdout
    assert "source: istio/" in run.stdout  # the rule's upstream source is named
    if entries:
        assert f"fault f1 ({entries[0]['kind']}) took effect" in server.output()


def test_adds_to_the_older_connection_fail_also_when_its_ack_deadline_comes_first(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    """The older connection was watched only after the newer one's wait (3 s here): the node
    agent's 2 s ack deadline closed it first, and the check said ERROR ("cannot write")."""
    held = make_pod()
    pods = tmp_path / "pods.jsonl"
    pods.write_text(json.dumps(pod_entry(held)) + "\n")
    faults = faults_file(tmp_path / "faults.jsonl", {"kind": "add-to-oldest", "count": 5})
    server = start_server("--pods", str(pods), "--faults", faults, "--ack-timeout", "2")
    run = zds_check("node-agent", *check_args(server, "--only", "adds-to-newest"), tmp=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.status("adds-to-newest") == "fail", run.stdout
    assert "arrived on the older connection" in run.findings("adds-to-newest"), run.stdout


def test_list_names_every_check_with_its_description(zds_cmd: list[str]) -> None:
    import subprocess

    done = subprocess.run(
        [*zds_cmd, "check", "node-agent", "--list"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    for check in CHECKS:
        assert f"{check.name}  " in done.stdout and check.description in done.stdout


@pytest.mark.parametrize(
    ("signum", "start"),
    [
        (signal.SIGTERM, []),
        (signal.SIGHUP, []),
        (signal.SIGINT, []),
        # Started with SIGINT ignored, as a script's background job is: it stayed ignored
        # (zds server and zds demo took it over; the check left it to asyncio, which did not).
        (signal.SIGINT, ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]),
    ],
    ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGINT-started-ignored"],
)
def test_a_sigterm_stops_the_check_as_ctrl_c_and_it_removes_what_it_made(
    start_server: StartServer, tmp_path: pathlib.Path, signum: signal.Signals, start: list[str]
) -> None:
    """SIGTERM (``timeout``, a CI runner) or SIGHUP (the terminal gone) killed zds check where it
    stood: the namespaces of its pods stayed for good. Now it stops as on Ctrl-C: clean-up, one
    line, exit 128+N; and the pods it had given the node agent are taken back (they stayed
    enrolled there, holding their netns)."""
    from zds import runtime

    server = start_server()

    def ours() -> set[str]:
        return {n for n in os.listdir("/var/run/netns") if n.startswith("zdsck-")}

    before = ours() if os.path.isdir("/var/run/netns") else set()
    check = subprocess.Popen(
        [*start, *ZDS, "check", "node-agent", *check_args(server)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # (its own session: no signal from the test's terminal)
    )
    try:
        wait_until(lambda: server.list_pods(), "the check's first pod in the node agent")
        check.send_signal(signum)
        _, err = check.communicate(timeout=60)
    finally:
        if check.poll() is None:
            check.kill()
            check.wait()
    assert check.returncode == 128 + signum, err
    stopped = runtime.how_stopped(runtime.Stopped(signum))  # ("interrupted": SIGINT)
    assert err.splitlines()[-1] == f"zds check node-agent: {stopped}; what it made is removed"
    assert ours() - before == set()
    assert server.list_pods() == []


def test_a_control_socket_that_does_not_answer_is_said_at_once_not_blamed_on_the_node_agent(
    start_server: StartServer, tmp_path: pathlib.Path
) -> None:
    """It ran for minutes, then failed four checks as the node agent's fault (pods missing from
    snapshots that were never added) and passed fd-hygiene on no pods at all."""
    server = start_server()
    missing = str(tmp_path / "no-control.sock")
    run = zds_check(
        "node-agent", "--zds-socket", server.zds_socket, "--control-socket", missing, *FAST, tmp=tmp_path
    )
    assert run.returncode == 2, run.stdout
    [line] = run.stderr.splitlines()
    assert line.startswith(
        f"zds check node-agent: cannot reach zds's control API at {missing} (UNAVAILABLE: "
    )
    assert line.endswith(
        "give the node agent's --control-socket, or make pods come and go with --add-cmd/--remove-cmd"
    )


def test_a_report_file_that_cannot_be_written_is_refused_before_anything_runs(
    start_server: StartServer, tmp_path: pathlib.Path
) -> None:
    """It was found out after the whole run (minutes), the report lost; and a report file made
    for a run that then cannot start goes again."""
    server = start_server()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for flag, path, says in (
        ("--json", tmp_path / "no" / "r.json", "No such file or directory"),
        ("--junit", tmp_path, "Is a directory"),
        ("--json", fifo, "No such device or address"),  # (nobody reads it: not waited on for good)
    ):
        done = subprocess.run(
            [*ZDS, "check", "node-agent", "--zds-socket", server.zds_socket, flag, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr == f"zds check node-agent: {flag} {path}: cannot write it: {says}\n"
    report, kept, dangling = tmp_path / "r.json", tmp_path / "kept.xml", tmp_path / "link.xml"
    kept.write_text("an earlier report")
    dangling.symlink_to(tmp_path / "target.xml")
    missing = str(tmp_path / "no-control.sock")

    def cannot_start(*reports: str) -> subprocess.CompletedProcess[str]:
        argv = ["node-agent", "--zds-socket", server.zds_socket, "--control-socket", missing, *reports]
        return subprocess.run([*ZDS, "check", *argv], capture_output=True, text=True, timeout=60)

    done = cannot_start("--json", str(report), "--junit", str(kept))
    assert done.returncode == 2 and "cannot reach zds's control API" in done.stderr
    assert not report.exists() and kept.read_text() == "an earlier report"
    # The file made where a dangling symlink led goes too.
    done = cannot_start("--junit", str(dangling))
    assert done.returncode == 2 and not (tmp_path / "target.xml").exists() and dangling.is_symlink()


def test_the_report_files_are_written_when_stdout_is_gone(
    start_server: StartServer, tmp_path: pathlib.Path
) -> None:
    """``zds check ... --json FILE | head -1``: the text report went first, the write to a
    stdout whose reader had gone ended the command, and the report files were lost."""
    server = start_server()
    report = tmp_path / "r.json"
    sockets = ["--zds-socket", server.zds_socket, "--control-socket", server.control_socket]
    proc = subprocess.Popen(
        [*ZDS, "check", "node-agent", *sockets, "--only", "hello-first", "--json", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # (the reader gone before anything was written)
    proc.wait(120)
    assert [c["name"] for c in json.loads(report.read_text())["checks"]] == ["hello-first"]


def test_a_report_to_a_fifo_reaches_its_reader(start_server: StartServer, tmp_path: pathlib.Path) -> None:
    """A reader that ends at its first end-of-file (``cat FIFO > FILE``): the file opened at
    the start and opened again for the report left it gone, and the check waited for good."""
    server = start_server()
    fifo, got = tmp_path / "fifo", tmp_path / "got.json"
    os.mkfifo(fifo)
    with open(got, "wb") as out:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=out)
    try:
        wait_until(lambda: _waits_for_a_writer(reader.pid), "the reader at the FIFO")
        sockets = ["--zds-socket", server.zds_socket, "--control-socket", server.control_socket]
        done = subprocess.run(
            [*ZDS, "check", "node-agent", *sockets, "--only", "hello-first", "--json", str(fifo)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert reader.wait(30) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert [c["name"] for c in json.loads(got.read_text())["checks"]] == ["hello-first"]


def _waits_for_a_writer(pid: int) -> bool:
    """Whether process ``pid`` is in its FIFO's open, waiting for a writer."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read() == "wait_for_partner"
    except OSError:
        return False


def test_an_agent_pid_that_is_no_process_is_refused_at_once(tmp_path: pathlib.Path) -> None:
    """It was a skipped fd-hygiene check and exit 0."""
    pid = 2**22 + 1  # above Linux's largest pid_max: never a process
    run = zds_check(
        "node-agent", "--zds-socket", str(tmp_path / "z.sock"), "--agent-pid", str(pid), tmp=tmp_path
    )
    assert (run.returncode, run.stderr) == (
        2,
        f"zds check node-agent: --agent-pid {pid}: no such process here\n",
    )


def test_a_node_agent_that_is_not_there_is_one_line_and_exit_2_not_a_pass(tmp_path: pathlib.Path) -> None:
    """Each check had its own ERROR for it, and the run exit 1 (README: exit 2 when it cannot start)."""
    for path, says in (
        (tmp_path / "none.sock", "no node agent socket at"),
        (tmp_path / "file", "is not a socket"),
    ):
        if path.name == "file":
            path.write_text("")
        done = subprocess.run(
            [*ZDS, "check", "node-agent", "--zds-socket", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stdout + done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith("zds check node-agent: ") and says in line, line
        assert done.stdout == ""
    made = os.listdir("/var/run/netns") if os.path.isdir("/var/run/netns") else []
    assert not [n for n in made if n.startswith("zdsck-")]


def test_a_socket_nothing_listens_on_or_not_a_seqpacket_one_is_one_line_and_exit_2(
    tmp_path: pathlib.Path,
) -> None:
    """A socket file left by a node agent that is gone, or a SOCK_STREAM socket: the first
    connect failed, each check had its own ERROR for it, and the run exit 1."""
    stale, stream = tmp_path / "stale.sock", tmp_path / "stream.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as gone:
        gone.bind(str(stale))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(stream))
        listener.listen()
        for path, says in (
            (stale, "Connection refused (nothing listens there: a socket file left by a node agent"),
            (stream, "(it is not a SOCK_SEQPACKET socket, which a ZDS socket is)"),
        ):
            # (pods by commands: no control API to reach first)
            done = subprocess.run(
                [
                    *ZDS,
                    "check",
                    "node-agent",
                    "--zds-socket",
                    str(path),
                    "--add-cmd",
                    "true",
                    "--remove-cmd",
                    "true",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 2, done.stdout + done.stderr
            [line] = done.stderr.splitlines()
            assert line.startswith(f"zds check node-agent: cannot connect to the node agent at {path}: "), (
                line
            )
            assert says in line, line
            assert done.stdout == ""


def _held_pod_left_out(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path, skip: int, only: str
) -> tuple[str, CheckRun]:
    """A node agent holding a pod from its ``--pods`` file, which it leaves out of the
    snapshot of its connection after ``skip``; the check of ``only`` against it."""
    held = make_pod()
    pods = tmp_path / "pods.jsonl"
    pods.write_text(json.dumps(pod_entry(held)) + "\n")
    uid = pod_entry(held)["uid"]
    omit = {"kind": "omit-from-snapshot", "uid": uid, "skip_connections": skip}
    server = start_server("--pods", str(pods), "--faults", faults_file(tmp_path / "faults.jsonl", omit))
    return uid, zds_check("node-agent", *check_args(server, "--only", only), tmp=tmp_path)


def test_a_pod_held_before_the_check_and_left_out_of_one_snapshot_fails_it(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    """Only the check's own pods could fail it: one the agent held already, left out of the
    second connection's snapshot (ztunnel drops its proxy there) and named in the third's again,
    was only noted, and the check passed."""
    uid, run = _held_pod_left_out(start_server, make_pod, tmp_path, 1, "snapshot-complete")
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.status("snapshot-complete") == "fail", run.stdout
    said = f"pod uid {uid}, held before the check, is not in the snapshot but is in a later one"
    assert said in run.findings("snapshot-complete"), run.stdout


def test_a_pod_held_before_the_check_and_left_out_of_the_last_snapshot_fails_the_check_of_that_snapshot(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    """Left out of the reconnect snapshot (the run's last), it was only noted and the check
    passed; and a pod left out of any snapshot failed whichever snapshot check came first."""
    uid, run = _held_pod_left_out(start_server, make_pod, tmp_path, 2, "snapshot-complete,reconnect-snapshot")
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.statuses() == {"snapshot-complete": "pass", "reconnect-snapshot": "fail"}, run.stdout
    [finding] = run.check("reconnect-snapshot")["findings"]
    assert finding["where"] == "conn 3", finding
    assert finding["message"].startswith(
        f"pod uid {uid}, held before the check, is not in the snapshot and no DelWorkload for it came"
    ), finding


def test_the_adds_of_pods_made_after_their_connection_opened_are_compared_with_the_pods_netns(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    """Each connection had its pods' netns copied when it opened: the ack-deadline scenario
    makes its pods later, and a wrong netns on their Adds passed."""
    held = make_pod()  # (the other pod whose netns the fault sends)
    pods = tmp_path / "pods.jsonl"
    pods.write_text(json.dumps(pod_entry(held)) + "\n")
    # The ack-deadline scenario's first connection (after hello-wait's and the exchange's).
    wrong = {"kind": "wrong-netns", "skip_connections": 2, "after_snapshot": True}
    faults = faults_file(tmp_path / "faults.jsonl", wrong)
    server = start_server("--pods", str(pods), "--faults", faults, "--ack-timeout", ACK_DEADLINE)
    only = ["--only", "add-netns-is-the-pods,ack-deadline", "--ack-deadline", ACK_DEADLINE]
    run = zds_check("node-agent", *check_args(server, *only), tmp=tmp_path)
    assert run.status("add-netns-is-the-pods") == "fail", run.stdout
    assert "not the pod's own netns" in run.findings("add-netns-is-the-pods"), run.stdout
    assert [f["where"] for f in run.check("add-netns-is-the-pods")["findings"]] == ["conn 3, record 3"]
    assert "fault f1 (wrong-netns) took effect" in server.output()
