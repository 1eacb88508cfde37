"""``zds check ztunnel`` against zds's own ztunnel side, both ways: every check holds against
``zds ztunnel`` (with listeners, without them, started by zds or connecting by itself), and every
check fails, with the right finding, against ``zds ztunnel`` with the matching fault armed
(``--faults FILE``) — so no check can hold vacuously."""

from __future__ import annotations

import glob
import http.server
import json
import os
import pathlib
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Any

import pytest

from tests.harness import (
    FAST_CHECK as FAST,
)
from tests.harness import (
    ZDS,
    ZtunnelProc,
    faults_file,
    http_post_json,
    wait_until,
    zds_check,
)
from tests.harness import (
    ZTUNNEL_CMD as ZTUNNEL,
)
from tests.standins import FakeNodeAgent
from zds.check.ztchecks import CHECKS, FATAL, LISTENERS
from zds.netns.fixtures import create_netns, delete_netns

pytestmark = pytest.mark.root

URLS = [
    "--ready-url",
    "http://127.0.0.1:{readiness_port}/healthz/ready",
    "--config-dump-url",
    "http://127.0.0.1:{admin_port}/config_dump",
]


def test_every_check_holds_against_zds_ztunnel(tmp_path: pathlib.Path) -> None:
    junit = tmp_path / "report.xml"
    run = zds_check(
        "ztunnel",
        "--cmd",
        ZTUNNEL + " --retry-interval 1",
        "--retry-interval",
        "1",
        *URLS,
        *FAST,
        "--junit",
        str(junit),
        tmp=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert set(run.statuses().values()) == {"pass"}, run.stdout
    assert [c["name"] for c in run.report["checks"]] == [c.name for c in CHECKS]
    assert "started the ztunnel 3 time(s)" in run.stdout  # once, then before each check after a stop for good
    assert junit.read_text().count("<testcase") == len(CHECKS)


def test_every_check_holds_against_zds_ztunnel_without_listeners(tmp_path: pathlib.Path) -> None:
    run = zds_check(
        "ztunnel", "--cmd", ZTUNNEL + " --no-listeners", "--protocol-only", *URLS, *FAST, tmp=tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
    statuses = run.statuses()
    assert {n for n, s in statuses.items() if s == "skip"} == LISTENERS
    assert {s for n, s in statuses.items() if n not in LISTENERS} == {"pass"}, run.stdout


@pytest.mark.parametrize("states", [None, [{"uid": "x"}]])
def test_a_config_dump_whose_workload_state_is_no_object_is_a_finding(
    tmp_path: pathlib.Path, states: Any
) -> None:
    """It was a traceback (a set of null, or of unhashable objects) and no report at all."""
    body = json.dumps({"workloadState": states}).encode()

    class Dump(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dump) as dump:
        threading.Thread(target=dump.serve_forever, daemon=True).start()
        try:
            run = zds_check(
                "ztunnel",
                "--cmd",
                ZTUNNEL + " --no-listeners",
                "--protocol-only",
                "--config-dump-url",
                f"http://127.0.0.1:{dump.server_address[1]}/config_dump",
                "--only",
                "reconcile",
                *FAST,
                tmp=tmp_path,
            )
        finally:
            dump.shutdown()
    assert "Traceback" not in run.stderr, run.stderr
    assert run.statuses()["reconcile"] == "fail", run.stdout
    assert "config_dump's workloadState is " in run.stdout and "not an object by uid" in run.stdout
    assert NO_LISTENERS not in run.stdout  # (--protocol-only was given)


def test_a_ztunnel_that_connects_by_itself_is_checked_too(tmp_path: pathlib.Path) -> None:
    socket = tmp_path / "zds.sock"
    report = tmp_path / "report.json"
    check = subprocess.Popen(
        [
            *ZDS,
            "check",
            "ztunnel",
            "--zds-socket",
            str(socket),
            "--skip",
            ",".join(FATAL),
            *FAST,
            "--json",
            str(report),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ztunnel = ZtunnelProc(str(socket), str(tmp_path / "ztunnel.log"))
    try:
        out, err = check.communicate(timeout=300)
    finally:
        if check.poll() is None:
            check.kill()
            check.wait()
        ztunnel.stop()
    assert check.returncode == 0, out + err
    assert "SKIP  readiness" in out  # no probe given
    assert not socket.exists()  # zds removed its socket


def netns_bound_ztunnel(netns: str) -> str:
    """A ztunnel command that listens on 15001 in its own netns (inherited across exec, so the
    ztunnel process holds it): what no-listeners-on-host must catch."""
    code = (
        "import os, socket, sys; s = socket.socket(); s.bind(('0.0.0.0', 15001)); s.listen(); "
        "os.set_inheritable(s.fileno(), True); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    return f'ip netns exec {netns} {sys.executable} -c "{code}" -m zds ' + ZTUNNEL.split(" -m zds ", 1)[1]


#: check -> (faults for zds ztunnel --faults, extra ztunnel flags, extra check flags, what the finding says)
PROOFS: dict[str, tuple[list[dict[str, Any]], str, list[str], str]] = {
    "hello": ([{"kind": "bad-hello"}], "", [], "the first record is not ZdsHello{V1}"),
    "replies-canonical": ([{"kind": "non-canonical-ack"}], "", [], "the answer is not canonical"),
    "speaks-only-when-asked": (
        [{"kind": "unsolicited-ack", "after": 1}],
        "",
        [],
        "a record nobody asked for",
    ),
    "reconnect": ([{"kind": "stop-reading"}], "", [], "no connection within"),
    "snapshot-sent-acked": ([{"kind": "never-ack"}], "", [], "SnapshotSent was answered with nothing"),
    "add-acked": (
        [{"kind": "nack-adds"}],
        "",
        [],
        "was answered with 'failure to start proxy : nack requested",
    ),
    "listeners-in-pod": ([], " --no-listeners", [], "expected [15001, 15006, 15008]"),
    "no-listeners-on-host": ([], "NETNS", [], "listening on [15001] in its own netns"),
    "listeners-closed-on-del": ([{"kind": "ack-blindly", "after": 2}], "", [], "still listening"),
    "del-unknown-uid": ([{"kind": "never-ack", "after": 1}], "", [], "was answered with nothing"),
    "readd-same-netns": (
        [{"kind": "nack-adds", "after": 2}],
        "",
        [],
        "the same AddWorkload again was answered",
    ),
    "readd-new-netns": ([{"kind": "nack-adds", "after": 2}], "", [], "with another netns was answered"),
    "reconcile": ([{"kind": "ack-blindly", "after": 6}], "", URLS, "B and C must be dropped"),
    "proxy-start-failure": (
        [{"kind": "ack-blindly", "after": 1}],
        "",
        [],
        "expected a nack starting 'failure to start proxy : '",
    ),
    # No fault needed: a ztunnel that retries later than the check waits.
    "pending-retry": ([], " --retry-interval 60", ["--retry-interval", "1"], "no retry"),
    "readiness": ([{"kind": "ack-blindly"}], "", URLS, "after SnapshotSent"),
    "empty-record": (
        [{"kind": "ack-blindly", "after": 1}],
        "",
        [],
        "a 0-byte record was answered with an empty Ack",
    ),
}
for _name in (
    "oversize-record",
    "undecodable-record",
    "no-payload",
    "add-without-fd",
    "add-with-two-fds",
    "fd-on-non-add",
):
    PROOFS[_name] = (
        [{"kind": "ack-blindly", "after": 1}],
        "",
        [],
        "expected a nack starting 'failure to read message : '",
    )
for _name in FATAL:
    PROOFS[_name] = (
        [{"kind": "ack-blindly", "after": 1}],
        "",
        [],
        "expected a nack starting 'failure to process message : '",
    )


def test_every_check_has_a_proof_that_it_can_fail() -> None:
    assert set(PROOFS) == {c.name for c in CHECKS}


@pytest.mark.parametrize("name", sorted(PROOFS))
def test_each_check_fails_against_zds_ztunnel_with_the_matching_fault(
    name: str, tmp_path: pathlib.Path
) -> None:
    entries, flags, check_flags, says = PROOFS[name]
    netns = ""
    if flags == "NETNS":
        netns = f"zdst-{uuid.uuid4().hex[:10]}"
        create_netns(netns)
        command = netns_bound_ztunnel(netns)
    else:
        command = ZTUNNEL + flags
    if entries:
        command += " --faults " + faults_file(tmp_path / "faults.jsonl", *entries)
    try:
        run = zds_check("ztunnel", "--cmd", command, "--only", name, *FAST, *check_flags, tmp=tmp_path)
    finally:
        if netns:
            delete_netns(netns, missing_ok=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.status(name) == "fail", run.stdout
    assert says in run.findings(name), run.stdout
    assert "source: istio/ztunnel" in run.stdout
    # (only the ztunnel that opens no listeners is pointed to --protocol-only: not one that retries late)
    assert (NO_LISTENERS in run.stdout) == (flags == " --no-listeners"), run.stdout


@pytest.mark.parametrize("name", ["listeners-closed-on-del", "readd-same-netns"])
def test_a_check_of_what_listeners_do_fails_when_they_never_came_up(
    name: str, tmp_path: pathlib.Path
) -> None:
    """A ztunnel that opened no listener passed both: nothing was listening after the Del,
    and nothing before and after the re-add was "untouched"."""
    run = zds_check("ztunnel", "--cmd", ZTUNNEL + " --no-listeners", "--only", name, *FAST, tmp=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.status(name) == "fail", run.stdout
    assert "not seen: the pod's listeners never all came up after its AddWorkload" in run.findings(name)


NO_LISTENERS = "no pod ever had a listener: a ztunnel that opens none is judged with --protocol-only"


@pytest.mark.parametrize("name", ["listeners-in-pod", "reconcile", "pending-retry"])
def test_a_ztunnel_that_opens_no_listeners_is_pointed_to_protocol_only(
    name: str, tmp_path: pathlib.Path
) -> None:
    """ztunnel's own code run with --no-listen failed these, and nothing said why."""
    run = zds_check("ztunnel", "--cmd", ZTUNNEL + " --no-listeners", "--only", name, *FAST, tmp=tmp_path)
    assert run.status(name) == "fail", run.stdout
    header = run.stdout.split("\n\n")[0].splitlines()
    assert [line for line in header if NO_LISTENERS in line] == [
        f"  {NO_LISTENERS} (and --config-dump-url, for the reconcile)"
    ], run.stdout
    assert any(NO_LISTENERS in line for line in run.report["context"])


def test_fd_on_non_add_says_all_three_records_in_its_line(tmp_path: pathlib.Path) -> None:
    """Its line said only the DelWorkload's refusal, not the KeepWorkload's and SnapshotSent's."""
    run = zds_check(
        "ztunnel", "--cmd", ZTUNNEL + " --no-listeners", "--only", "fd-on-non-add", *FAST, tmp=tmp_path
    )
    assert run.status("fd-on-non-add") == "pass", run.stdout
    nack = "'failure to read message : Unexpected control message'"
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("PASS  fd-on-non-add")]
    assert f"a Del, a Keep and a SnapshotSent with an fd: each nacked {nack}, closed, back " in line
    assert line.endswith(" ms later"), line
    # (each record's own line is kept in the report, after the one the summary shows)
    notes = run.check("fd-on-non-add")["notes"]
    assert [n.split(":")[0] for n in notes[1:]] == [
        "a DelWorkload with an fd",
        "a KeepWorkload with an fd",
        "a SnapshotSent with an fd",
    ]
    assert all(f"nacked {nack}, closed, back " in n for n in notes)


def test_ztunnel_faults_are_counted_and_listed_on_the_admin_endpoint(tmp_path: pathlib.Path) -> None:
    agent = FakeNodeAgent(str(tmp_path / "zds.sock"))
    ztunnel = ZtunnelProc(agent.path, str(tmp_path / "ztunnel.log"), "--no-listeners", "--faults-api")
    try:
        conn = agent.connect_and_hello()
        assert conn.snapshot().ok
        status, armed = http_post_json(
            f"http://{ztunnel.address('admin')}/faults", {"kind": "nack-adds", "text": "no"}
        )
        assert status == 200 and armed["kind"] == "nack-adds" and armed["state"] == "armed"
        ack = conn.delete("nobody")
        assert ack.ok  # only adds are nacked
        status, refused = http_post_json(f"http://{ztunnel.address('admin')}/faults", {"kind": "nope"})
        assert status == 400 and "unknown fault 'nope'" in refused["error"]
        wait_until(
            lambda: ztunnel.metrics().get('zds_ztunnel_faults_total{kind="nack-adds",outcome="injected"}'),
            "the count",
        )
    finally:
        ztunnel.stop()
        agent.close()


def test_what_is_at_its_zds_socket_path_and_is_not_a_stale_socket_is_refused_and_left_in_place(
    tmp_path: pathlib.Path,
) -> None:
    """zds check ztunnel unlinked whatever was at --zds-socket when it ended, also what it had
    refused: a file, a symlink, a running node agent's socket (no ztunnel could connect to that
    agent again); a directory ended in a traceback."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "file")
    agent = FakeNodeAgent(str(tmp_path / "served.sock"))
    scratch = set(glob.glob(os.path.join(tempfile.gettempdir(), "zds-check-*")))
    try:
        for name, says in (
            ("file", "is not a socket"),
            ("dir", "is a directory"),
            ("link", "is a symlink"),
            ("served.sock", "is a socket another program serves"),
        ):
            path = tmp_path / name
            run = zds_check("ztunnel", "--zds-socket", str(path), "--only", "hello", *FAST, tmp=tmp_path)
            assert run.returncode == 2, run.stdout + run.stderr
            assert os.path.lexists(path), f"{name} was removed"
            [line] = run.stderr.splitlines()
            assert line.startswith(f"zds check ztunnel: {path} {says}; refusing to replace it"), line
        assert stat.S_ISSOCK(os.lstat(agent.path).st_mode)
        # (a run that could not start left its scratch directory)
        assert set(glob.glob(os.path.join(tempfile.gettempdir(), "zds-check-*"))) == scratch
    finally:
        agent.close()


@pytest.mark.parametrize(
    ("flag", "template", "said"),
    [
        (
            "--cmd",
            "true {sock}",
            "--cmd 'true {sock}': unknown placeholder {sock}; use {socket}, {admin_port}",
        ),
        ("--cmd", "true {", "--cmd 'true {': Single '{' encountered"),
        (
            "--ready-url",
            "http://127.0.0.1:{port}/",
            "--ready-url 'http://127.0.0.1:{port}/': unknown placeholder",
        ),
        ("--config-dump-url", "http://x/{", "--config-dump-url 'http://x/{': Single '{'"),
    ],
)
def test_a_template_with_a_placeholder_zds_check_does_not_fill_is_refused_before_anything_runs(
    flag: str, template: str, said: str
) -> None:
    """--cmd's was a KeyError traceback (exit 1); the URLs' failed the run midway, after the
    namespaces were made."""
    before = set(glob.glob("/tmp/zds-check-*"))
    argv = ["--cmd", "true"] if flag != "--cmd" else []
    done = subprocess.run(
        [*ZDS, "check", "ztunnel", *argv, flag, template], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stderr.startswith(f"zds check ztunnel: {said}"), done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert set(glob.glob("/tmp/zds-check-*")) == before


#: A ztunnel that gets one thing wrong (argv: socket, how): ``late`` answers a bad record as
#: ztunnel does but connects again only 2 s after that close; ``lingers`` answers every record
#: after SnapshotSent with a ProtocolError nack and then neither reconnects nor exits; ``long``
#: nacks every other record with a 1,100-byte text (Istio's node agent reads 1,024). Otherwise it
#: answers as ztunnel does: hello first, SnapshotSent acked, anything else acked.
MISBEHAVING_ZTUNNEL = """
import socket, sys, time
from zds.protocol.messages import Ack, encode_ack
path, how = sys.argv[1], sys.argv[2]
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
    except OSError:
        time.sleep(0.05)
        continue
    s.sendall(bytes([8, 1]))
    snapshot_done = False
    while True:
        msg, anc, _, _ = s.recvmsg(2048, socket.CMSG_SPACE(64))
        if not msg:
            break
        if msg == bytes([0x1A, 0]):
            snapshot_done = True
            s.sendall(encode_ack(Ack("")))
        elif how == "late" and len(msg) == 3:
            s.sendall(encode_ack(Ack("failure to read message : undecodable")))
            s.close()
            time.sleep(2)
            break
        elif how == "lingers" and snapshot_done:
            s.sendall(encode_ack(Ack("failure to process message : ProtocolError(\\"late keep\\")")))
            s.close()
            time.sleep(3600)
        elif how == "long":
            s.sendall(encode_ack(Ack("failure to start proxy : " + "x" * 1100), whole=True))
        else:
            s.sendall(encode_ack(Ack("")))
    s.close()
"""


@pytest.mark.parametrize(
    ("how", "name", "says"),
    [
        ("late", "undecodable-record", "back only"),
        ("lingers", "keep-after-snapshot", "still running 3s later; a ProtocolError stops ztunnel"),
        ("long", "replies-canonical", "Istio's node agent reads an answer into 1024"),
    ],
)
def test_a_ztunnel_late_back_still_running_or_answering_long_fails(
    how: str, name: str, says: str, tmp_path: pathlib.Path
) -> None:
    script = tmp_path / "ztunnel.py"
    script.write_text(MISBEHAVING_ZTUNNEL)
    command = f"{sys.executable} {script} {{socket}} {how}"
    # (replies-canonical's own exchange sends no Add: proxy-start-failure's gets the long nack)
    only = f"{name},proxy-start-failure" if how == "long" else name
    run = zds_check("ztunnel", "--cmd", command, "--only", only, "--protocol-only", *FAST, tmp=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.status(name) == "fail", run.stdout
    assert says in run.findings(name), run.stdout


def test_a_record_sent_unasked_right_after_the_hello_is_seen(tmp_path: pathlib.Path) -> None:
    # (The check closes the first connection as soon as it read the hello: before it read on
    # a moment more, the Ack the fault sends right after it slipped by in about half the runs.)
    command = (
        ZTUNNEL + " --no-listeners --faults " + faults_file(tmp_path / "f.jsonl", {"kind": "unsolicited-ack"})
    )
    for _ in range(3):
        run = zds_check("ztunnel", "--cmd", command, "--only", "speaks-only-when-asked", *FAST, tmp=tmp_path)
        assert run.status("speaks-only-when-asked") == "fail", run.stdout
        assert "a record nobody asked for" in run.findings("speaks-only-when-asked"), run.stdout


def test_readiness_that_does_not_answer_500_before_the_snapshot_fails(tmp_path: pathlib.Path) -> None:
    with socket.socket() as unused:  # (a port nobody listens on once closed: connection refused)
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    url = f"http://127.0.0.1:{port}/healthz/ready"
    run = zds_check(
        "ztunnel", "--cmd", ZTUNNEL, "--only", "readiness", "--ready-url", url, *FAST, tmp=tmp_path
    )
    assert run.status("readiness") == "fail", run.stdout
    assert "no answer from" in run.findings("readiness"), run.stdout
