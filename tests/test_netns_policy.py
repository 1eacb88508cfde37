"""Which netns the node agent takes as a pod's, on the paths the gRPC tests do not cover:
never the node's own (a CNI event, ``zds pod add``), and named namespaces only under an
allowed root (``--netns-root`` adds one)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.harness import NodeAgentProc, Pod, post_unix, run_unique
from tests.standins import AckingPeer
from zds.gen import nodeagent_pb2
from zds.netns import NetnsError, NetnsRef, open_netns
from zds.server.netnspolicy import NetnsPolicy, NetnsRefused, _shares_netns_with_pid_1
from zds.server.redirect import Redirector

pytestmark = pytest.mark.root

OWN_NETNS = "is the node agent's own netns"


def node_rules() -> list[str]:
    """Whatever of the in-pod rules is in this (the node's) netns: our chains and jumps in
    either family, Istio's nftables tables, the fwmark rule and the routes of table 100."""

    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout

    found = [
        line
        for tool in ("iptables-save", "ip6tables-save")
        for line in run(tool).splitlines()
        if "ISTIO" in line
    ]
    found += [line for line in run("nft", "list", "tables").splitlines() if "istio" in line]
    for family in ("-4", "-6"):
        found += [line for line in run("ip", family, "rule").splitlines() if "lookup 100" in line]
        found += run("ip", family, "route", "show", "table", "100").splitlines()
    return found


@pytest.fixture
def node_untouched() -> Iterator[None]:
    """The node's netns has none of the in-pod rules afterwards that it did not have before;
    if a test put some in anyway, they are taken out (the test has failed by then) — only
    where the node had none before: rules someone else put there are not ours to remove."""
    before = node_rules()
    yield
    after = node_rules()
    if after != before and not before:

        async def take_out() -> None:
            with open_netns("/proc/self/ns/net") as node:
                await Redirector().remove(node)

        asyncio.run(take_out())
    if after != before:
        pytest.fail(f"in-pod rules went into the node's netns: {sorted(set(after) - set(before))}")


@pytest.fixture
def rules_server(tmp_path: Path, node_untouched: None) -> Iterator[NodeAgentProc]:
    """A node agent that installs the in-pod rules (so a netns it took would get them)."""
    server = NodeAgentProc(str(tmp_path), redirect=True).wait_ready()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def link_to_the_node() -> Iterator[str]:
    """A name under /var/run/netns that is a symlink to the node's netns."""
    link = f"/var/run/netns/{run_unique('zds-test-node-')}"
    os.symlink("/proc/self/ns/net", link)
    try:
        yield link
    finally:
        os.unlink(link)


def test_a_cni_event_naming_the_node_is_500_as_istios_with_one_warning_line(
    rules_server: NodeAgentProc, link_to_the_node: str
) -> None:
    for netns in ("/proc/self/ns/net", link_to_the_node):
        body = json.dumps({"Netns": netns, "PodName": "web", "PodNamespace": "shop"}).encode()
        status, answer = post_unix(rules_server.cni_socket, "/cmdadd", body)
        assert status == 500, answer  # (Istio's agent: any failure once the body parsed)
        assert OWN_NETNS in answer and answer.endswith("\n") and answer.count("\n") == 1, answer
    assert rules_server.list_pods() == []
    rules_server.wait_for_output("refused CNI add event")
    refusals = [line for line in rules_server.output().splitlines() if OWN_NETNS in line]
    assert len(refusals) == 2 and all(
        " warning zds.server.cni: refused CNI add event: " in r for r in refusals
    )
    assert " error " not in rules_server.output() and "Traceback" not in rules_server.output()


def test_zds_pod_add_naming_the_node_is_refused_in_one_line(
    rules_server: NodeAgentProc, link_to_the_node: str
) -> None:
    for netns in ("/proc/self/ns/net", link_to_the_node):
        done = rules_server.cli("pod", "add", "--uid", "u1", "--netns", netns)
        assert done.returncode == 1
        assert done.stdout == ""
        [line] = done.stderr.splitlines()
        assert line.startswith("zds pod add: u1: INVALID_ARGUMENT: ") and OWN_NETNS in line, line
    assert rules_server.list_pods() == []


#: The node agent's capabilities in the compose file: no ptrace access to pid 1 (which has more).
COMPOSE_CAPS = ("setpriv", "--bounding-set=-all,+sys_admin,+net_admin", "--inh-caps=-all")


@pytest.fixture
def node_by_name() -> Iterator[str]:
    """The node's netns under /var/run/netns (``ip netns attach``: a bind mount, which opening
    needs no ptrace access for, as a container engine's ``ns:`` network names it)."""
    name = run_unique("zds-test-node-")
    subprocess.run(["ip", "netns", "attach", name, str(os.getpid())], check=True)
    try:
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_a_node_agent_in_a_netns_of_its_own_that_cannot_tell_the_nodes_does_not_start(
    tmp_path: Path, make_pod: Callable[[], Pod]
) -> None:
    """The compose file's node agent (SYS_ADMIN and NET_ADMIN only, a netns of its own) cannot
    read /proc/1/ns/net, so it could not refuse the node's netns: it took it as a pod's, rules
    and all. It does not start now, in one line saying why and what to do."""
    own = make_pod()
    server = NodeAgentProc(str(tmp_path), wrapper=("ip", "netns", "exec", own.name, *COMPOSE_CAPS))
    try:
        assert server.wait_exit() == 1
        [line] = server.output().splitlines()
        assert line.partition(" error zds.server: ")[2] == (
            "cannot tell which netns is the node's, so it could not be refused as a pod's: "
            "/proc/1/ns/net: Permission denied, and pid 1 is not in the node agent's own netns; give "
            "the node agent CAP_SYS_PTRACE (as Istio's node agent has), or run it in the node's netns"
        ), line
        assert not os.path.exists(server.zds_socket) and not os.path.exists(server.control_socket)
    finally:
        server.stop()


def test_a_node_agent_in_the_nodes_netns_without_ptrace_access_refuses_the_node(
    tmp_path: Path, node_by_name: str, node_untouched: None
) -> None:
    """Without access to /proc/1/ns/net, the node agent finds pid 1 in its own netns by a socket
    of its own in /proc/1/net/unix: the node's netns, refused by any name."""
    server = NodeAgentProc(str(tmp_path), redirect=True, wrapper=COMPOSE_CAPS).wait_ready()
    try:
        for netns in (node_by_name, "/proc/self/ns/net"):
            done = server.cli("pod", "add", "--uid", "u1", "--netns", netns)
            assert done.returncode == 1
            [line] = done.stderr.splitlines()
            assert line.startswith("zds pod add: u1: INVALID_ARGUMENT: ") and (
                "is the node agent's own netns and pid 1's (" in line
            ), line
        assert server.list_pods() == []
    finally:
        server.stop()


def test_the_socket_listing_is_read_whatever_bytes_a_socket_path_holds(tmp_path: Path) -> None:
    """Any process may bind a unix socket at a path that is not UTF-8: read as text, the
    listing was a UnicodeDecodeError that stopped the node agent's start (where pid 1's netns
    cannot be stat'ed: a container without ptrace access)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as odd:
        odd.bind(os.fsencode(tmp_path) + b"/\xff.sock")
        odd.listen(1)
        # (this process's own listing: the odd path is in it, and so is the probe)
        assert _shares_netns_with_pid_1("/proc/self/net/unix")
    assert not _shares_netns_with_pid_1(str(tmp_path / "no-listing"))


def test_pid_1_is_refused_by_name_even_where_its_netns_cannot_be_opened(tmp_path: Path) -> None:
    """Without ptrace access /proc/1/ns/net cannot be opened, so its identity cannot be
    compared: a pods file entry naming it was kept as a pod known without netns (KeepWorkload
    to every ztunnel). Pid 1 is never a pod, whatever its netns."""
    pods = tmp_path / "pods.jsonl"
    pods.write_text(json.dumps({"uid": "u1", "netns": "pid:1"}) + "\n")
    server = NodeAgentProc(str(tmp_path), "--pods", str(pods), wrapper=COMPOSE_CAPS).wait_ready()
    try:
        assert server.list_pods() == []
        server.wait_for_output("pods file entry refused: netns path /proc/1/ns/net is pid 1's")
        for how in (["--netns-pid", "1"], ["--netns", "/proc/1/../1/ns/net"]):
            done = server.cli("pod", "add", "--uid", "u2", *how)
            assert done.returncode == 1
            [line] = done.stderr.splitlines()
            assert line.startswith("zds pod add: u2: INVALID_ARGUMENT: netns path /proc/1/") and (
                "/ns/net is pid 1's: the node is never enrolled as a pod" in line
            ), line
        assert server.list_pods() == []
    finally:
        server.stop()


@pytest.fixture
def custom_root(tmp_path: Path, make_pod: Callable[[], Pod]) -> Iterator[tuple[Path, str]]:
    """A directory outside the default roots, with a pod's netns bind-mounted in it (as a
    container runtime with its own netns directory does): (the directory, the netns file)."""
    root = tmp_path / "netns-root"
    root.mkdir()
    pod = make_pod()
    target = root / "pod-a"
    target.touch()
    subprocess.run(["mount", "--bind", pod.path, str(target)], check=True)
    try:
        yield root, str(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_netns_under_another_directory_needs_netns_root(
    tmp_path: Path, custom_root: tuple[Path, str]
) -> None:
    root, netns = custom_root
    without = NodeAgentProc(str(tmp_path), name="without").wait_ready()
    try:
        with pytest.raises(grpc.RpcError) as info:
            without.add_pod("u1", netns)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert f"netns path {netns} is not under an allowed root" in details
        assert "add its directory with --netns-root" in details
        assert without.list_pods() == []
    finally:
        without.stop()
    with_root = NodeAgentProc(str(tmp_path), "--netns-root", str(root), name="with").wait_ready()
    peer = AckingPeer(with_root.zds_socket)
    try:
        peer.wait_snapshot()
        with_root.add_pod("u1", netns)
        [pod] = with_root.list_pods()
        assert pod.uid == "u1" and pod.state == nodeagent_pb2.POD_STATE_ACKED
        assert pod.netns_path == netns and pod.netns.ino == os.stat(netns).st_ino
    finally:
        peer.close()
        with_root.stop()


def test_a_netns_root_made_after_the_start_is_said_missing_at_the_start_and_taken_once_made(
    tmp_path: Path, make_pod: Callable[[], Pod]
) -> None:
    """A --netns-root that is not there yet was taken silently (a typo too). It is said, not
    refused: a runtime makes its netns directory with its first netns (Docker's
    /var/run/docker/netns), maybe after the node agent started, as /var/run/netns is."""
    root = tmp_path / "later"
    server = NodeAgentProc(str(tmp_path), "--netns-root", str(root), name="early").wait_ready()
    peer = AckingPeer(server.zds_socket)
    target = root / "pod-a"
    try:
        assert (
            f"warning zds.server: --netns-root {root} does not exist (yet): pods' namespaces there are "
            "taken once it is made; check the path if nothing is to make it\n"
        ) in server.output()
        peer.wait_snapshot()
        root.mkdir()
        target.touch()
        subprocess.run(["mount", "--bind", make_pod().path, str(target)], check=True)
        server.add_pod("u1", str(target))
        [pod] = server.list_pods()
        assert pod.state == nodeagent_pb2.POD_STATE_ACKED and pod.netns_path == str(target)
    finally:
        peer.close()
        server.stop()
        subprocess.run(["umount", str(target)], capture_output=True)


def test_the_place_is_checked_where_the_kernel_opened_the_directory(
    tmp_path: Path, make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    policy = NetnsPolicy.for_this_node()
    # A directory reached through a symlink counts where it really is: an allowed root ...
    (tmp_path / "run").symlink_to(os.path.dirname(pod.path))
    via_link = str(tmp_path / "run" / pod.name)
    with policy.open(NetnsRef.of_path(via_link)) as handle:
        assert handle.identity.ino == os.stat(pod.path).st_ino
        assert handle.path == via_link  # messages keep naming the path as it was given
    # ... and a symlink under an allowed root to a directory elsewhere is refused, as `..` is.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "pod").touch()
    subprocess.run(["mount", "--bind", pod.path, str(elsewhere / "pod")], check=True)
    link = f"/var/run/netns/{run_unique('zds-test-dir-')}"
    os.symlink(elsewhere, link)
    try:
        for path in (f"{link}/pod", f"/var/run/netns/../..{elsewhere}/pod"):
            with pytest.raises(NetnsRefused, match="is not under an allowed root"):
                policy.open(NetnsRef.of_path(path)).close()
    finally:
        os.unlink(link)
        subprocess.run(["umount", str(elsewhere / "pod")], check=True)


def test_a_netns_in_another_mount_namespace_is_not_under_an_allowed_root() -> None:
    """/proc/PID/root/run/netns/X: the kernel names that directory as the process sees it,
    /run/netns, which passed for the node's. A netns from any mount namespace was taken so."""
    name = run_unique("zds-test-mnt-")
    script = f"mount -t tmpfs none /run/netns && ip netns add {name} && echo ready && exec sleep 60"
    child = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        path = f"/proc/{child.pid}/root/run/netns/{name}"
        assert os.path.exists(path) and not os.path.exists(f"/run/netns/{name}")
        with pytest.raises(
            NetnsRefused, match=r"is in another mount namespace .*: not under an allowed root"
        ):
            NetnsPolicy.for_this_node().open(NetnsRef.of_path(path)).close()
    finally:
        child.kill()
        child.wait(10)


def test_a_mount_over_a_netns_in_another_mount_namespace_that_shares_the_directory_is_refused(
    make_pod: Callable[[], Pod],
) -> None:
    """``unshare -m`` without a mount of its own on /run/netns: the directory there is the
    node's (the same inode), but a bind mount over one of its entries is that namespace's
    alone. /proc/PID/root/run/netns/A opened B's netns, which the node's A does not name."""
    a, b = make_pod(), make_pod()
    script = f"mount --bind {b.path} {a.path} && echo ready && exec sleep 60"
    child = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        policy = NetnsPolicy.for_this_node()
        with policy.open(NetnsRef.of_path(a.path)) as here, policy.open(NetnsRef.of_path(b.path)) as there:
            assert here.identity != there.identity
        with pytest.raises(
            NetnsRefused, match=r"is in another mount namespace .*not that netns\): not under"
        ):
            # (/run, not /var/run: that link is absolute, and leads back into this view)
            policy.open(NetnsRef.of_path(f"/proc/{child.pid}/root/run/netns/{a.name}")).close()
    finally:
        child.kill()
        child.wait(10)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/var/run/netns/a\0b", "does not name a file"),
        ("/var/run\0/netns/ab", "does not name a file"),
        ("/var/run/netns/..", "does not name a file"),
        (
            "/var/run/netns/x\n2026-12-02T00:00:00.000Z info  zds.server: pod enrolled",
            r"x\\n2026.*not printable",
        ),
        ("/var/run/netns/\x1b[2Jx", r"/var/run/netns/\\x1b\[2Jx has a character that is not printable"),
        ("relative/pod", "is not absolute"),
        ("/proc/999999999/ns/net", "process 999999999 does not exist"),
        ("/var/run/netns/zds-test-none", 'create it with "zds netns create zds-test-none"'),
    ],
)
def test_a_netns_that_cannot_be_taken_is_refused_in_one_line(path: str, message: str) -> None:
    with pytest.raises(NetnsError, match=message) as info:
        NetnsPolicy.for_this_node().open(NetnsRef(path=path)).close()
    assert "\n" not in str(info.value)


def test_an_add_pod_with_a_nul_in_its_netns_path_is_invalid_not_internal(server: NodeAgentProc) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.add_pod("u1", "/var/run\0/netns/pod")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "does not name a file" in (info.value.details() or "")
    assert "Traceback" not in server.output()


def test_a_pod_whose_netns_root_is_no_longer_allowed_is_kept_and_its_rules_left_alone(
    tmp_path: Path, custom_root: tuple[Path, str], make_pod: Callable[[], Pod]
) -> None:
    """Enrolled under --netns-root, the agent restarted without it: the stored path is not
    opened (its place is not allowed now) and the netns is not found by identity (only that
    bind mount holds it), so the pod stays known, sent as KeepWorkload, its row kept and its
    rules untouched (a --pods entry of its uid elsewhere does not replace it: the store
    wins); given --netns-root again, it is restored as it was."""
    root, netns = custom_root
    pods = tmp_path / "pods.jsonl"
    pods.write_text(json.dumps({"uid": "u1", "netns": make_pod().path}) + "\n")
    named = [name for name in os.listdir("/run/netns") if os.path.samefile(f"/run/netns/{name}", netns)]
    subprocess.run(["ip", "netns", "delete", *named], check=True)  # the bind mount alone holds it

    def rules() -> str:
        """The netns's IPv4 rules as iptables-save prints them, less its dated comments."""
        saved = subprocess.run(
            ["nsenter", f"--net={netns}", "iptables-save"], capture_output=True, text=True, check=True
        ).stdout
        return "\n".join(line for line in saved.splitlines() if not line.startswith("#"))

    first = NodeAgentProc(str(tmp_path), "--netns-root", str(root), redirect=True, name="first")
    peer = AckingPeer(first.wait_ready().zds_socket)
    try:
        peer.wait_snapshot()
        first.add_pod("u1", str(netns))
    finally:
        peer.close()
        first.stop()
    enrolled = rules()
    assert "ISTIO_OUTPUT" in enrolled
    second = NodeAgentProc(str(tmp_path), "--pods", str(pods), redirect=True, name="second").wait_ready()
    peer = AckingPeer(second.zds_socket)
    try:
        peer.wait_snapshot()
        [kept] = second.list_pods()
        assert (kept.uid, kept.recovery) == ("u1", "netns place not allowed")
        assert kept.rules_installed, "where its netns lives, so do its rules"
        assert peer.kinds == ["keep", "snapshot_sent"]
        assert f"netns path {netns} is not under an allowed root" in second.output()
        assert "pods file entry skipped: the pod store holds this pod already" in second.output()
    finally:
        peer.close()
        second.stop()
    assert rules() == enrolled
    third = NodeAgentProc(str(tmp_path), "--netns-root", str(root), redirect=True, name="third")
    try:
        [restored] = third.wait_ready().list_pods()
        assert (restored.uid, restored.recovery) == ("u1", "restored")
        third.remove_pod("u1")
    finally:
        third.stop()
    assert "ISTIO_OUTPUT" not in rules()


@pytest.mark.root
@pytest.mark.parametrize(
    ("mode", "owner", "says"), [(0o1777, 0, "mode 1777"), (0o755, 65534, "owned by another user")]
)
def test_a_netns_root_others_can_write_is_refused_at_start(
    tmp_path: Path, mode: int, owner: int, says: str
) -> None:
    """Whoever could write a --netns-root could put there a link to any netns (another
    pod's) for the node agent to take as a pod's: it was taken silently."""
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(mode)
    os.chown(root, owner, -1)
    server = NodeAgentProc(str(tmp_path), "--netns-root", str(root))
    try:
        assert server.proc.wait(15) == 1
        server.wait_for_output(f"cannot use --netns-root {root}: others can write it ({says})")
    finally:
        server.stop()


@pytest.mark.root
def test_a_netns_root_made_or_opened_to_others_after_the_start_is_refused_at_each_open(
    tmp_path: Path, make_pod: Callable[[], Pod]
) -> None:
    """The check at start saw a root as it was then: one not there yet, or opened to others
    since (a directory of the same name made by another user), let a link put there name any
    netns, and it was enrolled."""
    pod = make_pod()
    root = tmp_path / "later"
    policy = NetnsPolicy.for_this_node([str(root)])  # (not there yet: taken)
    root.mkdir()
    os.chmod(root, 0o777)
    (root / "pod").touch()
    subprocess.run(["mount", "--bind", pod.path, str(root / "pod")], check=True)
    try:
        with pytest.raises(NetnsRefused, match=f"others can write its directory {root} \\(mode 0777\\)"):
            policy.open(NetnsRef.of_path(str(root / "pod"))).close()
        os.chmod(root, 0o755)
        os.chown(root, 65534, -1)
        with pytest.raises(NetnsRefused, match="owned by another user"):
            policy.open(NetnsRef.of_path(str(root / "pod"))).close()
        os.chown(root, 0, -1)
        with policy.open(NetnsRef.of_path(str(root / "pod"))) as handle:
            assert handle.identity.ino == os.stat(pod.path).st_ino
    finally:
        subprocess.run(["umount", str(root / "pod")], check=True)


@pytest.mark.root
def test_a_netns_root_only_root_and_its_group_can_write_is_taken(tmp_path: Path) -> None:
    """As a directory made by root under umask 002 is (0775 root:root)."""
    root = tmp_path / "grouped"
    root.mkdir()
    root.chmod(0o775)
    os.chown(root, 0, 0)
    assert str(root) in NetnsPolicy.for_this_node([str(root)]).roots
