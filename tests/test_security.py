"""The node agent's security boundary, with real peers of other uids, real TLS (openssl,
grpcurl) and real floods: who may talk, what is refused, and that refusals cost nothing."""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    ZDS,
    NodeAgentProc,
    ZdsProcess,
    fd_count,
    free_port,
    pod_netns,
    pods_file,
    post_unix,
    wait_until,
)
from tests.standins import RawPeer
from zds.check.inpod import socket_inodes
from zds.gen import nodeagent_pb2
from zds.server import socketaccess
from zds.server.bulkwire import MAGIC, frame
from zds.server.options import ServerOptions
from zds.server.peergate import connection_capacity

pytestmark = pytest.mark.root

NOBODY = 65534
GRPCURL = str(Path(sys.executable).parent / "grpcurl")

#: Run as another user with the system's python3 (the venv's is under /root): connect to a
#: unix socket, send ``data``, print what came back before EOF (hex) or the error.
AS_OTHER_USER = textwrap.dedent(
    """
    import socket, sys
    kind = socket.SOCK_SEQPACKET if sys.argv[2] == "seqpacket" else socket.SOCK_STREAM
    s = socket.socket(socket.AF_UNIX, kind)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
        s.send(bytes.fromhex(sys.argv[3]))
        print("answer:" + s.recv(65536).hex())
    except OSError as e:
        print("error:" + e.strerror)
    """
)


def as_user(
    uid: int, path: str, kind: str, data: bytes, *, gid: int | None = None, groups: tuple[int, ...] = ()
) -> str:
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid if gid is not None else uid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
            "/usr/bin/python3",
            "-c",
            AS_OTHER_USER,
            path,
            kind,
            data.hex(),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp dirs are root's, 0700)."""
    made = Path(tempfile.mkdtemp(prefix="zds-sec-"))
    made.chmod(0o755)
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def reachable(server: NodeAgentProc, mode: int = 0o666) -> None:
    """Let every user reach the socket files (their directories 0755, the files ``mode``)."""
    for path in (server.zds_socket, server.control_socket, server.cni_socket):
        os.chmod(os.path.dirname(path), 0o755)
        if mode:
            os.chmod(path, mode)


@pytest.fixture
def opened_sockets(public_dir: Path) -> Iterator[NodeAgentProc]:
    """A node agent whose socket files anyone may open (mode 0666 set by the test), so that only
    its SO_PEERCRED check stands between another user and it."""
    server = NodeAgentProc(str(public_dir), "--http-listen", "127.0.0.1:0").wait_ready()
    try:
        reachable(server)
        yield server
    finally:
        server.stop()


HELLO = bytes.fromhex("0801")
HTTP = b"POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def test_a_peer_not_on_the_allow_list_is_refused_on_every_socket_and_logged_once(
    opened_sockets: NodeAgentProc,
) -> None:
    server = opened_sockets
    # Closed at once, nothing answered (EOF; or a reset or broken pipe, when what was sent is unread).
    closed = ("answer:", "error:Connection reset by peer", "error:Broken pipe")
    assert as_user(NOBODY, server.zds_socket, "seqpacket", HELLO) in closed  # no snapshot
    assert as_user(NOBODY, server.control_socket, "stream", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") in closed
    assert as_user(NOBODY, server.cni_socket, "stream", HTTP) in closed
    for name in ("ZDS", "control", "CNI plugin"):
        server.wait_for_output(f"refused a connection on the {name} socket from pid")
    lines = [line for line in server.output().splitlines() if "refused a connection" in line]
    assert len(lines) == 3 and all(f"uid {NOBODY} gid {NOBODY}" in line for line in lines)
    # The ZDS socket's refusal is counted as well (the others are no ztunnel connections).
    metrics = server.http_get("/metrics")[1]
    assert 'zds_ztunnel_connections_refused_total{reason="not_allowed"} 1.0' in metrics.splitlines()
    assert all("permission denied" in line and "/usr/bin/python3" in line for line in lines)
    # The bulk lane (zds pod add --from-file without gRPC) is behind the same door.
    pod = nodeagent_pb2.AddPodRequest(uid="u", netns_path=pod_netns())
    lane = MAGIC + frame(nodeagent_pb2.AddPodsRequest(pods=[pod]).SerializeToString())
    assert as_user(NOBODY, server.control_socket, "stream", lane) in closed
    wait_until(
        lambda: server.output().count("refused a connection on the control socket") == 2,
        "the lane connection refused and logged",
    )
    assert server.list_pods() == []


def test_allow_uid_lets_that_user_in_and_no_other(public_dir: Path) -> None:
    """An ACL entry opens the files (and the directories the start made) to that user alone:
    the flag alone let no one in (the files root's, 0600), and another user is kept out by
    the kernel before the node agent's own check."""
    other = NOBODY - 1
    server = NodeAgentProc(str(public_dir), "--allow-uid", str(NOBODY)).wait_ready()
    try:
        # The hello is answered with the (empty) snapshot: SnapshotSent.
        assert as_user(NOBODY, server.zds_socket, "seqpacket", HELLO) == "answer:1a00"
        assert as_user(NOBODY, server.cni_socket, "stream", HTTP).startswith("answer:")
        for path in (server.zds_socket, server.control_socket, server.cni_socket):
            assert as_user(other, path, "stream", b"x") == "error:Permission denied", path
        assert "cannot connect to" not in server.output() and "refused a connection" not in server.output()
    finally:
        server.stop()


def test_a_directory_the_start_did_not_make_that_keeps_an_allowed_peer_out_is_said(public_dir: Path) -> None:
    (public_dir / "ztunnel").mkdir(mode=0o700)  # (made beforehand: the start leaves it as it is)
    (public_dir / "zds").mkdir(mode=0o700)
    os.setxattr(public_dir / "zds", "system.posix_acl_access", _ACL_NOBODY_ENTERS)
    server = NodeAgentProc(str(public_dir), "--allow-uid", str(NOBODY)).wait_ready()
    try:
        # Kept out of the ZDS socket (and said, in one line); let in by the ACL to the control socket.
        assert as_user(NOBODY, server.zds_socket, "seqpacket", HELLO) == "error:Permission denied"
        server.wait_for_output(
            f"uid {NOBODY} (may not enter {public_dir / 'ztunnel'}) cannot connect to {server.zds_socket}: "
            "the node agent lets them in, the filesystem does not"
        )
        assert as_user(NOBODY, server.control_socket, "stream", b"x").startswith(
            "answer:"
        )  # (gRPC's settings)
        lines = [line for line in server.output().splitlines() if "cannot connect to" in line]
        assert len(lines) == 1, lines
        assert oct(os.stat(public_dir / "ztunnel").st_mode & 0o777) == "0o700"  # (not this start's)
    finally:
        server.stop()


def test_a_directory_further_up_that_keeps_an_allowed_peer_out_is_said_too(public_dir: Path) -> None:
    """Only each socket's own directory was looked at."""
    deep = public_dir / "deep"
    deep.mkdir(mode=0o700)
    server = NodeAgentProc(str(deep), "--allow-uid", str(NOBODY)).wait_ready()
    try:
        for path in (server.zds_socket, server.control_socket, server.cni_socket):
            server.wait_for_output(f"uid {NOBODY} (may not enter {deep}) cannot connect to {path}: ")
    finally:
        server.stop()


def test_more_allowed_peers_than_an_acl_holds_is_a_refused_start_that_leaves_nothing(
    public_dir: Path,
) -> None:
    """tmpfs takes some 8,000 entries: a traceback, and the socket and its directory left."""
    paths = ["--zds-socket", str(public_dir / "z" / "ztunnel.sock"), "--state-dir", str(public_dir / "state")]
    paths += [
        "--control-socket",
        str(public_dir / "control.sock"),
        "--cni-socket",
        "off",
        "--http-listen",
        "off",
    ]
    flags = [f"--allow-uid={uid}" for uid in range(20_000, 29_000)]
    done = subprocess.run([*ZDS, "server", *paths, *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].endswith(
        f"error zds.server: cannot open {public_dir / 'z' / 'ztunnel.sock'} to --socket-group/--allow-uid/"
        "--allow-gid (9000 ACL entries asked for): Argument list too long"
    ), done.stderr[-2000:]
    assert sorted(os.listdir(public_dir)) == []


def acl(*entries: tuple[int, int, int]) -> bytes:
    """An ACL as the kernel's xattr holds it: a version, then (tag, permissions, id) each;
    tags 1 owner, 2 a user, 4 the group, 8 a group, 16 the mask, 32 others."""
    return (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
        for tag, perm, ident in entries
    )


NO_ID = 2**32 - 1
#: A directory's: owner rwx, user NOBODY x, group ---, mask x, others ---.
_ACL_NOBODY_ENTERS = acl((1, 7, NO_ID), (2, 1, NOBODY), (4, 0, NO_ID), (16, 1, NO_ID), (32, 0, NO_ID))


def test_entries_a_parent_s_default_acl_puts_on_the_files_stay_masked_out(public_dir: Path) -> None:
    """With --allow-uid, the ACL written kept every entry already there and widened the mask
    for them: those a parent's default ACL had put there (masked out by the 0600 and 0750 so
    far) came into effect: another user could connect, and rename the ZDS socket away."""
    other, group = 1000, 2000
    full = ((1, 7, NO_ID), (2, 7, other), (4, 5, NO_ID), (8, 7, group), (16, 7, NO_ID), (32, 5, NO_ID))
    os.setxattr(public_dir, "system.posix_acl_default", acl(*full))
    server = NodeAgentProc(str(public_dir), "--allow-uid", str(NOBODY)).wait_ready()
    try:
        assert as_user(NOBODY, server.zds_socket, "seqpacket", HELLO) == "answer:1a00"
        for uid, gid in ((other, other), (NOBODY - 1, group)):
            assert as_user(uid, server.zds_socket, "seqpacket", HELLO, gid=gid) == "error:Permission denied"
        made = os.path.dirname(server.zds_socket)
        with pytest.raises(OSError):
            os.getxattr(made, "system.posix_acl_default")  # (nothing made in it inherits them)
    finally:
        server.stop()


def test_a_socket_named_by_a_relative_path_opens_the_directory_made_for_it(
    public_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directories the start made are absolute paths: one made for ``rel/x.sock`` was
    never taken for one (left 0750 root's, its allowed user kept out)."""
    monkeypatch.chdir(public_dir)
    os.mkdir("rel", 0o750)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("rel/x.sock")
        listener.listen()
        os.chmod("rel/x.sock", 0o600)
        peers = socketaccess.Peers(uids=frozenset({NOBODY}), gids=frozenset())
        socketaccess.give("rel/x.sock", ServerOptions(), peers, [str(public_dir / "rel")])

        def answer() -> None:
            with listener.accept()[0] as conn:
                conn.recv(16)  # (read: a close with the byte unread is a reset)

        closer = threading.Thread(target=answer, daemon=True)
        closer.start()
        assert as_user(NOBODY, str(public_dir / "rel" / "x.sock"), "stream", b"x") == "answer:"
        closer.join(10)


def test_a_directory_whose_acl_mask_is_empty_is_judged_by_its_mode_as_the_kernel_does(
    public_dir: Path,
) -> None:
    """The kernel does not look at an ACL whose mask (the mode's group bits) is empty: a
    named user's entry counts for nothing, others' bits decide. The start said such a user
    kept out of a directory it can enter."""
    (public_dir / "ztunnel").mkdir()
    os.setxattr(
        public_dir / "ztunnel",
        "system.posix_acl_access",
        acl((1, 7, NO_ID), (2, 0, NOBODY), (4, 0, NO_ID), (16, 0, NO_ID), (32, 1, NO_ID)),
    )
    server = NodeAgentProc(str(public_dir), "--allow-uid", str(NOBODY)).wait_ready()
    try:
        assert as_user(NOBODY, server.zds_socket, "seqpacket", HELLO) == "answer:1a00"
        assert "cannot connect to" not in server.output()
    finally:
        server.stop()


def test_socket_group_gives_the_sockets_to_a_group_and_lets_it_in(public_dir: Path) -> None:
    group = 4242
    server = NodeAgentProc(str(public_dir), "--socket-group", str(group)).wait_ready()
    try:
        for path in (server.zds_socket, server.control_socket, server.cni_socket):
            st, parent = os.stat(path), os.stat(os.path.dirname(path))
            assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o660", group)
            # The directory this start made for it: the group may enter (nobody else).
            assert (oct(parent.st_mode & 0o777), parent.st_gid) == ("0o750", group)
        assert "cannot connect to" not in server.output()
        assert as_user(NOBODY, server.zds_socket, "seqpacket", HELLO, gid=group) == "answer:1a00"
        # As a supplementary group too (usermod -aG, a pod's supplementalGroups): the file let
        # that user connect, and the node agent turned it away, knowing its primary gid only.
        for path, kind, data in (
            (server.zds_socket, "seqpacket", HELLO),
            (server.cni_socket, "stream", HTTP),
        ):
            # (300 more groups: past the 256 Python's getsockopt has room for)
            for groups in ((77, group), (*range(20_000, 20_300), group)):
                answer = as_user(NOBODY, path, kind, data, groups=groups)
                assert answer.startswith("answer:") and answer != "answer:", (path, len(groups), answer)
        assert "refused a connection" not in server.output()
        # Without the group, the file's mode already keeps that user out.
        assert as_user(NOBODY, server.zds_socket, "seqpacket", HELLO) == "error:Permission denied"
    finally:
        server.stop()


def test_a_client_that_may_not_reach_the_socket_is_told_permission_denied(tmp_path: Path) -> None:
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    try:
        code = textwrap.dedent(
            f"""
            import os, grpc
            import zds.gen.nodeagent_pb2_grpc  # loaded as root: the checkout may be closed to nobody
            from zds.server.controlclient import ControlError, ControlTarget
            os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
            try:
                with ControlTarget(socket={server.control_socket!r}).stub():
                    pass
            except ControlError as e:
                print(e)
            """
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
        assert out.startswith(f"cannot reach the node agent at {server.control_socket}: permission denied")
        assert "the socket file is not open to you: zds server --socket-group GROUP" in out, out
    finally:
        server.stop()


def test_pod_add_from_file_as_a_user_kept_out_is_told_permission_denied(public_dir: Path) -> None:
    """Over the bulk lane as over gRPC: the socket file's mode keeps the user out (EACCES at
    connect), said in one line with the hint; and, let in by the file but not by the
    allow-list, every pod says it was turned away, with the same hint."""
    server = NodeAgentProc(str(public_dir)).wait_ready()
    try:
        pods = pods_file(public_dir, [{"uid": "u1", "netns": "/var/run/netns/x"}])
        os.chmod(pods, 0o644)
        code = textwrap.dedent(
            f"""
            import os, sys
            from zds.cli import build_parser, main
            # loaded as root: the checkout may be closed to nobody (the lane's first form, which
            # the command takes once turned away from the JSON form, loads the generated messages)
            import zds.server.podadd, zds.server.podsfile, zds.gen.nodeagent_pb2, google.protobuf.message
            build_parser("pod")
            os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
            code = main(["pod", "add", "--from-file", {pods!r}, "--control-socket", {server.control_socket!r}])
            print("grpc loaded" if "grpc" in sys.modules else "grpc not loaded")
            sys.exit(code)
            """
        )

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

        reachable(server, mode=0o600)  # the directories open, the file root's alone
        kept_out = run()
        assert kept_out.returncode == 1
        assert kept_out.stderr.startswith(
            f"zds pod add: cannot reach the node agent at {server.control_socket}: permission denied (you are not "
            "root, and the socket file is not open to you"
        ), kept_out.stderr
        reachable(server)  # the file open to all: the allow-list turns the user away
        turned_away = run()
        assert turned_away.returncode == 1 and "grpc not loaded" in turned_away.stdout
        assert turned_away.stderr.startswith(
            f"zds pod add: u1: the node agent at {server.control_socket} closed the connection without answering "
            "(you are not root"
        ), turned_away.stderr
        assert server.list_pods() == []
    finally:
        server.stop()


# -- the control API on TCP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("certs")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=zds test CA")  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=zds {name}")  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return {
        name: str(d / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    }


def test_grpc_listen_without_tls_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    proc = NodeAgentProc(str(tmp_path), "--grpc-listen", f"127.0.0.1:{free_port()}")
    try:
        assert proc.wait_exit() == 1
        assert "--grpc-listen needs --tls-cert and --tls-key" in proc.output()
        assert "Traceback" not in proc.output()
        assert not os.path.exists(proc.zds_socket)
    finally:
        proc.stop()


def test_tls_files_that_are_no_pem_or_cannot_be_read_are_refused_before_anything_is_made(
    tmp_path: Path, certs: dict[str, str]
) -> None:
    """A FIFO with no writer blocked the start for good (only SIGKILL ended it, its sockets left);
    a directory was refused after the store was opened; garbage made gRPC say it could not bind."""
    fifo, garbage, directory = tmp_path / "fifo", tmp_path / "garbage.pem", tmp_path / "dir"
    os.mkfifo(fifo)
    garbage.write_text("not a certificate\n")
    directory.mkdir()
    cases = (
        (str(fifo), f"--tls-cert {fifo}: cannot read it (a FIFO that gave nothing"),
        (str(garbage), f"--tls-cert {garbage}: no PEM certificate in it"),
        (str(directory), f"--tls-cert {directory}: cannot read it (Is a directory)"),
        (certs["server.key"], "no PEM certificate in it"),
    )
    for i, (cert, said) in enumerate(cases):
        run = tmp_path / f"run{i}"
        run.mkdir()
        flags = [
            "--grpc-listen",
            f"127.0.0.1:{free_port()}",
            "--tls-cert",
            cert,
            "--tls-key",
            certs["server.key"],
        ]
        proc = NodeAgentProc(str(run), *flags)
        try:
            assert proc.wait_exit() == 1
            assert said in proc.output() and "Traceback" not in proc.output(), proc.output()
            assert sorted(os.listdir(run)) == ["server.log"], "a refused start left something behind"
        finally:
            proc.stop()


def agent_with_tls(tmp_path: Path, certs: dict[str, str], *extra: str) -> tuple[str, NodeAgentProc]:
    """A node agent serving the control API on 127.0.0.1 with the server certificate (and
    ``extra`` flags); its address and the process."""
    address = f"127.0.0.1:{free_port()}"
    tls = ["--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"], *extra]
    return address, NodeAgentProc(str(tmp_path), "--grpc-listen", address, *tls).wait_ready()


def test_the_control_api_on_tcp_with_mutual_tls_answers_grpcurl_and_zds_with_certificates_only(
    tmp_path: Path, certs: dict[str, str]
) -> None:
    address, proc = agent_with_tls(tmp_path, certs, "--tls-client-ca", certs["ca.pem"])
    try:
        tls = ["-cacert", certs["ca.pem"], "-cert", certs["client.pem"], "-key", certs["client.key"]]
        listed = subprocess.run([GRPCURL, *tls, address, "list"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert "zds.v1.NodeAgent" in listed.stdout.split()
        no_cert = subprocess.run(
            [GRPCURL, "-cacert", certs["ca.pem"], address, "list"], capture_output=True, text=True, timeout=60
        )
        assert no_cert.returncode != 0
        plaintext = subprocess.run(
            [GRPCURL, "-plaintext", address, "list"], capture_output=True, text=True, timeout=60
        )
        assert plaintext.returncode != 0

        client = ["--grpc-address", address, "--tls-ca", certs["ca.pem"]]
        mutual = [*client, "--tls-cert", certs["client.pem"], "--tls-key", certs["client.key"]]
        done = subprocess.run(
            [*ZDS, "pod", "list", "--json", *mutual], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == []
        refused = subprocess.run([*ZDS, "pod", "list", *client], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"zds pod list: cannot reach the node agent at {address}")
        assert len(refused.stderr.strip().splitlines()) == 1
        # A server certificate it does not trust: gRPC core's "I1205 ... Handshake failed" line
        # came first (the one line after it says the same).
        untrusted = [*mutual[:2], "--tls-ca", certs["client.pem"], *mutual[4:]]
        refused = subprocess.run(
            [*ZDS, "pod", "list", *untrusted], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"zds pod list: cannot reach the node agent at {address}"), (
            refused.stderr
        )
        assert len(refused.stderr.strip().splitlines()) == 1
    finally:
        proc.stop()


def test_the_control_api_on_tcp_with_server_tls_only_answers_grpcurl_and_zds_that_trust_its_ca(
    tmp_path: Path, certs: dict[str, str]
) -> None:
    """Without --tls-client-ca no client certificate is asked for: the channel is encrypted
    and the server authenticated, and a client that does not trust its CA is refused."""
    address, proc = agent_with_tls(tmp_path, certs)
    try:

        def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=60)

        listed = grpcurl("-cacert", certs["ca.pem"], address, "list")
        assert listed.returncode == 0, listed.stderr
        assert "zds.v1.NodeAgent" in listed.stdout.split()
        pods = grpcurl("-cacert", certs["ca.pem"], address, "zds.v1.NodeAgent/ListPods")
        assert pods.returncode == 0, pods.stderr
        assert json.loads(pods.stdout) == {}
        assert grpcurl(address, "list").returncode != 0  # the system's CAs do not know ours
        assert grpcurl("-plaintext", address, "list").returncode != 0

        done = subprocess.run(
            [*ZDS, "pod", "list", "--json", "--grpc-address", address, "--tls-ca", certs["ca.pem"]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == []
        plaintext = subprocess.run(
            [*ZDS, "pod", "list", "--grpc-address", address, "--grpc-insecure"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plaintext.returncode == 1
        assert plaintext.stderr.startswith(f"zds pod list: cannot reach the node agent at {address}")
        assert len(plaintext.stderr.strip().splitlines()) == 1
    finally:
        proc.stop()


# -- floods -----------------------------------------------------------------------------------


def test_control_connections_that_say_nothing_are_bounded_and_closed_in_time(tmp_path: Path) -> None:
    """A connection to the control socket must say what it is (gRPC's preface, the bulk
    lane's opening) within 10 s, and at most 64 may be silent at once (the oldest goes, once
    silent for 1 s: a burst is accepted before any is read): silent ones, a lane opening cut
    short and an HTTP/2 preface cut short are all closed, each said in one line, and the
    socket serves on. (Otherwise each held its fds for good.)"""
    from zds import defaults

    server = NodeAgentProc(str(tmp_path)).wait_ready()
    held: list[socket.socket] = []

    def connect(data: bytes) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(server.control_socket)
        sock.sendall(data)
        held.append(sock)
        return sock

    try:
        cut = [connect(b""), connect(MAGIC[:6]), connect(b"PRI * HTTP/2.0\r\n")]
        silent = [connect(b"") for _ in range(defaults.CONTROL_SILENT_MAX)]  # 65 in a burst: all kept
        time.sleep(defaults.CONTROL_SILENT_GRACE + 0.2)
        silent += [connect(b"") for _ in range(6)]
        for sock in [cut[0], *silent[:5]]:  # 71 silent: the 6 oldest go at once
            sock.settimeout(5)
            assert sock.recv(1) == b""
        assert all(not select.select([sock], [], [], 0)[0] for sock in silent[5:])  # the rest wait
        assert server.list_pods() == []  # a client that speaks is served meanwhile
        for sock in cut + silent:  # (gRPC speaks first on the cut preface: read to the end)
            sock.settimeout(defaults.CONTROL_OPENING_TIMEOUT + 10)
            while sock.recv(4096):
                pass
        # The 6 oldest went at once, one more for the ListPods call's connection (it too
        # was silent for a moment, while 65 others were), the rest at the timeout. (Lines
        # reach the log through its writer thread: a moment after the sockets close.)

        def said() -> tuple[int, int]:
            out = server.output()
            return (
                out.count("a connection closed: more than 64 connections said nothing yet"),
                out.count("a connection closed: it said nothing within 10s"),
            )

        wait_until(lambda: sum(said()) >= 71, "a line for each connection closed")
        evicted, timed_out = said()
        assert evicted >= 6 and evicted + timed_out == 71, (evicted, timed_out)
        out = server.output()
        assert out.count("a bulk-lane connection closed: it did not finish its opening within 10s") == 1
        assert "Traceback" not in out
        assert server.list_pods() == []
    finally:
        for sock in held:
            sock.close()
        server.stop()


def closed(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (reset: it left what was sent unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_control_sockets_room_shrinks_with_a_low_fd_limit() -> None:
    """3 fds a connection, at most half of those beyond the node agent's 256-fd reserve."""
    assert connection_capacity(20_000) == 256
    assert connection_capacity(1024) == 128  # (768 fds beyond the reserve: 384 for connections)
    assert connection_capacity(320) == 16  # (the least the node agent starts with)
    assert connection_capacity(resource.RLIM_INFINITY) == 256


def test_control_socket_connections_that_speak_are_bounded_too(tmp_path: Path) -> None:
    """Each connection let through to gRPC holds 3 fds for as long as its client keeps a call
    open: an allowed client could hold them without limit. At most 256 are open at once (fewer
    under a low RLIMIT_NOFILE); more are closed, said once, and the socket serves again once
    some end."""

    server = NodeAgentProc(str(tmp_path)).wait_ready()
    held: list[socket.socket] = []
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + SETTINGS
    capacity = connection_capacity(resource.prlimit(server.pid, resource.RLIMIT_NOFILE)[0])
    try:
        before = fd_count(server.pid)
        for _ in range(capacity + 20):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(server.control_socket)
            sock.sendall(preface)
            sock.settimeout(10)
            held.append(sock)
        kept, extra = held[:capacity], held[capacity:]
        assert all(sock.recv(9)[3:4] == b"\x04" for sock in kept)  # gRPC's SETTINGS: let through
        assert all(closed(sock) for sock in extra)
        assert fd_count(server.pid) - before <= 3 * capacity + 8
        full = f"{capacity} connections are open; "
        wait_until(lambda: full in server.output(), "the warning")
        assert server.output().count(full) == 1  # (said once for the 20)
        for sock in held:
            sock.close()
        held.clear()
        # (the node agent sees the closes a moment later: the call waits for its channel)
        wait_until(lambda: fd_count(server.pid) - before < 16, "the connections' fds given back")
        assert server.list_pods() == []
        assert "Traceback" not in server.output()
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_half_sent_cni_requests_are_closed_in_time_each_with_one_warning_never_a_traceback(
    tmp_path: Path,
) -> None:
    server = NodeAgentProc(str(tmp_path), "--cni-request-timeout", "1").wait_ready()
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(server.cni_socket)
            sock.sendall(b"POST /cmdadd HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            held.append(sock)
        for sock in held:
            sock.settimeout(15)
            assert sock.recv(1) == b"", "the node agent closed the half-sent request"
        # Each closed in time, or (more than 64 waiting at once) the oldest first: one warning each.
        waited = "did not arrive within 1s"
        cut = "request had not come whole: more than 64 were waiting"
        wait_until(
            lambda: server.output().count(waited) + server.output().count(cut) == 300,
            "one warning per closed request",
        )
        assert server.output().count(cut) >= 300 - 64
        assert "Traceback" not in server.output()
        # The endpoint still answers a real request.
        body = json.dumps({"Netns": pod_netns(), "PodName": "web", "PodNamespace": "shop"}).encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(server.cni_socket)
        sock.sendall(b"POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        sock.settimeout(15)
        assert sock.recv(65536).startswith(b"HTTP/1.1 500")  # no ztunnel: Istio's 500 with the reason
        sock.close()
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_a_cni_request_aiohttp_answers_itself_closes_its_connection_too(tmp_path: Path) -> None:
    """A path or method the CNI endpoint does not serve (404, 405: raised by aiohttp's router,
    past the middleware's own answer) was answered keep-alive: its connection stayed open for
    aiohttp's 75 s, outside the limit on connections waiting, and a client looping on it held
    any number of the node agent's fds."""
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    try:
        for request, status in ((b"GET /nope", b"404"), (b"DELETE /cmdadd", b"405")):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(server.cni_socket)
                sock.sendall(request + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.settimeout(5)
                answer = b""
                while chunk := sock.recv(65536):  # (to the node agent's close: a timeout fails)
                    answer += chunk
                head = answer.split(b"\r\n\r\n")[0].lower()
                assert head.startswith(b"http/1.1 " + status) and b"connection: close" in head
        assert "Traceback" not in server.output()
    finally:
        server.stop()


def test_idle_cni_connections_cannot_use_up_the_node_agents_fds(tmp_path: Path) -> None:
    """Each connection that says nothing lived its 10 s: 20,000 of them took every fd the node
    agent had, and the control API with them. At most 64 wait at once (the oldest is closed)."""
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    held: list[socket.socket] = []
    try:
        before = fd_count(server.pid)
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(server.cni_socket)
            held.append(sock)
        wait_until(
            lambda: server.output().count("more than 64 were waiting") >= 1000 - 64, "the oldest closed"
        )
        assert fd_count(server.pid) < before + 64 + 16
        assert server.cli("pod", "list").returncode == 0
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_a_cni_request_over_the_body_cap_or_the_concurrency_cap_is_refused(tmp_path: Path) -> None:
    # A ztunnel that never acks keeps enrollments (and so CNI requests) in flight.
    server = NodeAgentProc(str(tmp_path), "--cni-max-requests", "2", "--ack-timeout", "30").wait_ready()
    mute = RawPeer(server.zds_socket)
    waiting: list[socket.socket] = []
    try:
        mute.hello()
        assert mute.expect().payload == bytes.fromhex("1a00")
        mute.ack()
        for name in ("a", "b"):
            body = json.dumps(
                {"Netns": pod_netns(), "PodName": name, "PodNamespace": "shop", "PodUID": name}
            ).encode()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(server.cni_socket)
            sock.sendall(b"POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            waiting.append(sock)
        wait_until(lambda: len(server.list_pods()) == 2, "two enrollments in flight")
        third = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        third.connect(server.cni_socket)
        third.sendall(HTTP)
        third.settimeout(15)
        busy = third.recv(65536)
        assert busy.startswith(b"HTTP/1.1 503") and b"\r\nRetry-After: 1\r\n" in busy  # (zds-cni asks again)
        third.close()
        big = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        big.connect(server.cni_socket)
        big.sendall(b"POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000)
        big.settimeout(15)
        answer = big.recv(65536)
        big.close()
        assert answer.startswith((b"HTTP/1.1 413", b"HTTP/1.1 503"))
        server.wait_for_output("requests in flight already")
        assert "Traceback" not in server.output()
    finally:
        for sock in waiting:
            sock.close()
        mute.close()
        server.stop()


def test_a_bad_cni_del_body_is_400_and_one_warning_line(tmp_path: Path) -> None:
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    try:
        status, answer = post_unix(server.cni_socket, "/cmddel", json.dumps({"PodUID": 7}).encode())
        assert status == 400 and answer == "PodUID is missing or not a non-empty string\n"
        server.wait_for_output("bad CNI plugin DEL event")
        [line] = [line for line in server.output().splitlines() if "bad CNI plugin DEL event" in line]
        assert " warning zds.server.cni: bad CNI plugin DEL event: PodUID is missing" in line
        assert " error " not in server.output() and "Traceback" not in server.output()
    finally:
        server.stop()


def test_garbage_on_the_zds_socket_is_a_warning_with_the_peers_pid(tmp_path: Path) -> None:
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    peer = RawPeer(server.zds_socket)
    try:
        peer.send(b"\xff\xfe garbage")
        peer.expect_closed()
        server.wait_for_output(
            f"warning zds.server: closed the connection from pid {os.getpid()} uid 0: bad hello"
        )
    finally:
        peer.close()
        server.stop()


def test_the_ztunnel_side_says_connected_only_once_the_hello_is_answered(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    z = ZdsProcess(
        ["ztunnel", "--zds-socket", path, "--no-listeners", "--admin-listen", "off", "--readiness-listen", "off",
         "--metrics-listen", "off"],
        str(tmp_path / "ztunnel.log"),
    )  # fmt: skip
    try:
        listener.settimeout(15)
        conn, _ = listener.accept()
        conn.settimeout(15)
        assert conn.recv(1024) == HELLO
        assert "connected to the node agent" not in z.output()
        conn.send(bytes.fromhex("1a00"))  # SnapshotSent: the first answer
        assert conn.recv(1024) == bytes.fromhex("0a00")
        z.wait_for_output("connected to the node agent")
        conn.close()
    finally:
        z.stop()
        listener.close()


def test_a_ztunnel_that_keeps_failing_on_eacces_says_permission_denied(tmp_path: Path) -> None:
    """Root without CAP_DAC_OVERRIDE against a socket that is another user's, 0600: EACCES."""
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o600)
    no_override = "-dac_override,-dac_read_search"
    z = ZdsProcess(
        ["ztunnel", "--zds-socket", path, "--no-listeners", "--admin-listen", "off", "--readiness-listen", "off",
         "--metrics-listen", "off"],
        str(tmp_path / "ztunnel.log"),
        wrapper=["setpriv", f"--bounding-set={no_override}", f"--inh-caps={no_override}"],
    )  # fmt: skip
    try:
        z.wait_for_output(f"failed to connect to the node agent over {path}: permission denied")
    finally:
        z.stop()
        listener.close()


def test_the_node_is_refused_from_a_pods_file_and_from_the_pod_store(tmp_path: Path) -> None:
    host = f"/proc/{os.getpid()}/ns/net"
    pods = tmp_path / "pods.jsonl"
    pods.write_text(json.dumps({"uid": "u1", "netns": host}) + "\n")
    server = NodeAgentProc(str(tmp_path), "--pods", str(pods)).wait_ready()
    try:
        assert server.list_pods() == []
        assert (
            "pods file entry refused" in server.output()
            and "is the node agent's own netns" in server.output()
        )
    finally:
        server.stop()
    # A row that names the node (written behind the agent's back) is dropped on reload.
    from zds.netns import NetnsIdentity, NetnsRef
    from zds.server.pods import PodSpec
    from zds.server.store import PodStore

    st = os.stat(host)
    store = PodStore.open(server.state_dir, used_before=True)
    store.put(PodSpec.create("u2", NetnsRef.of_path(host)), NetnsIdentity(st.st_dev, st.st_ino))
    store.close()
    again = NodeAgentProc(str(tmp_path), name="again").wait_ready()
    try:
        assert again.list_pods() == []
        assert "pod refused on reload, dropped from the pod store" in again.output()
    finally:
        again.stop()


@pytest.mark.parametrize(
    ("namespace", "name", "text"),
    [
        ("ns/../x", "web", "namespace 'ns/../x' is not a DNS-1123 label"),
        ("Shop", "web", "namespace 'Shop' is not a DNS-1123 label"),
        ("shop", "web..1", "name 'web..1' is not a DNS-1123 subdomain"),
    ],
)
def test_names_are_checked_like_kubernetes_on_the_cni_path_too(
    namespace: str, name: str, text: str, tmp_path: Path
) -> None:
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    try:
        body = json.dumps({"Netns": pod_netns(), "PodName": name, "PodNamespace": namespace}).encode()
        status, answer = post_unix(server.cni_socket, "/cmdadd", body)
        assert status == 500 and text in answer
        assert server.list_pods() == []
    finally:
        server.stop()


def test_the_control_gate_closes_a_spliced_connection_once_both_sides_are_done(tmp_path: Path) -> None:
    """Found by zds check's fd-hygiene: a client that hangs up (here at once, before the gate
    has even reached gRPC) must not leave the gate holding two sockets."""
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    try:
        before = len(socket_inodes(server.pid))
        for _ in range(10):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(server.control_socket)
                client.shutdown(socket.SHUT_WR)
                client.settimeout(10)
                while client.recv(65536):
                    pass  # gRPC's SETTINGS, then its EOF once it saw ours
        wait_until(lambda: len(socket_inodes(server.pid)) <= before, "the gate to let go of every connection")
    finally:
        server.stop()


def test_a_peers_program_is_named_with_its_escapes_in_a_log_line(tmp_path: Path) -> None:
    """Any local user names their program: a newline in it forged a log line of the node agent's."""
    from zds.server.peers import executable

    program = tmp_path / "x\n2026-12-02T00:00:00.000Z info  zds.server: pod enrolled \x1b[2J"
    shutil.copy("/bin/sleep", program)
    running = subprocess.Popen([str(program), "30"])
    try:
        wait_until(lambda: os.path.exists(f"/proc/{running.pid}/exe"), "the program running")
        named = executable(running.pid)
        assert named == f"{tmp_path}/x\\n2026-12-02T00:00:00.000Z info  zds.server: pod enrolled \\x1b[2J"
    finally:
        running.kill()
        running.wait(10)
