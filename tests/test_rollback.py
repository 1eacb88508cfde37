"""A failed enrollment leaves the namespace as it was: when a step fails after rules went
in (a later rule step, the pod-store write), what went in is taken out again. Real
failures in real namespaces, and the whole netns state compared before and after."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.harness import NodeAgentProc, Pod, run_all
from tests.standins import RawPeer

pytestmark = pytest.mark.root

#: What a pod may hold of its own before it is enrolled: a chain with a rule in every table
#: and built-in chain the rules use (they are not ours, and must still be there afterwards).
OWN_RULES = "".join(
    f"*{table}\n:POD_OWN - [0:0]\n-A POD_OWN -p udp --dport 9 -j RETURN\n"
    + "".join(f"-A {chain} -j POD_OWN\n" for chain in ("PREROUTING", "OUTPUT"))
    + "COMMIT\n"
    for table in ("mangle", "nat", "raw")
)

#: Everything in a netns the rules touch, as the tools print it.
STATE_COMMANDS = (
    ["iptables-save"],
    ["ip6tables-save"],
    ["nft", "list", "ruleset"],
    ["ip", "-4", "rule"],
    ["ip", "-6", "rule"],
    ["ip", "-4", "route", "show", "table", "100"],
    ["ip", "-6", "route", "show", "table", "100"],
)


def in_pod(
    pod: Pod, *argv: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", pod.name, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
    )


def netns_state(pod: Pod) -> dict[str, str]:
    """The netns's rules and policy routing, as the tools print them (iptables-save without
    its dated comments and counters). Table 100 is compared by its routes: once a route was
    in it the kernel keeps the (empty) table for the netns's life, and ``ip route show``
    says "FIB table does not exist" only before that."""
    state = {}
    for argv in STATE_COMMANDS:
        done = in_pod(pod, *argv, check=False)
        if "FIB table does not exist" in done.stderr:
            text = ""
        else:
            assert done.returncode == 0, done.stderr
            text = done.stdout
        if argv[0].endswith("-save"):
            text = "\n".join(
                re.sub(r" \[\d+:\d+\]$", "", line) for line in text.splitlines() if line[:1] != "#"
            )
        state[" ".join(argv)] = text
    return state


def a_pod_of_its_own(pod: Pod) -> None:
    """Give the pod rules of its own, IPv4 and IPv6, and a global IPv6 address."""
    in_pod(pod, "iptables-restore", "--noflush", stdin=OWN_RULES)
    in_pod(pod, "ip6tables-restore", "--noflush", stdin=OWN_RULES)
    in_pod(pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    in_pod(pod, "ip", "addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad")


@pytest.fixture
def rules_server(tmp_path: Path) -> Iterator[Callable[..., NodeAgentProc]]:
    started: list[NodeAgentProc] = []

    def start(*extra: str) -> NodeAgentProc:
        server = NodeAgentProc(str(tmp_path), *extra, redirect=True).wait_ready()
        started.append(server)
        return server

    yield start
    run_all([server.stop for server in started], "node agents")


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_rule_step_that_fails_after_rules_went_in_leaves_the_netns_as_it_was(
    backend: str, make_pod: Callable[[], Pod], rules_server: Callable[..., NodeAgentProc]
) -> None:
    """The pod's loopback is down: the IPv4 and IPv6 rules and the IPv4 policy routing go
    in, then the IPv6 local route via lo is refused by the kernel (ENETDOWN)."""
    pod = make_pod()
    a_pod_of_its_own(pod)
    in_pod(pod, "ip", "link", "set", "lo", "down")
    before = netns_state(pod)
    server = rules_server("--redirect-backend", backend)
    with pytest.raises(grpc.RpcError) as info:
        server.add_pod("u1", pod.path)
    details = info.value.details() or ""
    assert info.value.code() is grpc.StatusCode.INTERNAL, details
    assert "cannot install in-pod redirection rules for pod u1" in details
    assert "cannot add the local route: Network is down" in details
    assert server.list_pods() == []
    assert netns_state(pod) == before
    assert "cannot take out a partly installed rule set" not in server.output()


@pytest.fixture
def tiny_state_dir(tmp_path: Path) -> Iterator[Path]:
    """The node agent's state directory on a 1 MiB tmpfs of its own (unmounted at the end)."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "zds-test", str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", str(state)], check=True)


def fill(directory: Path) -> None:
    """Write a file until the file system is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def test_a_pod_store_that_cannot_take_the_pod_leaves_the_netns_as_it_was(
    tmp_path: Path,
    tiny_state_dir: Path,
    make_pod: Callable[[], Pod],
    rules_server: Callable[..., NodeAgentProc],
) -> None:
    pod = make_pod()
    a_pod_of_its_own(pod)
    before = netns_state(pod)
    server = rules_server()
    assert server.state_dir == str(tiny_state_dir)
    peer = RawPeer(server.zds_socket)
    try:
        peer.hello()
        peer.take_snapshot()
        fill(tiny_state_dir)
        with pytest.raises(grpc.RpcError) as info:
            server.add_pod("u1", pod.path)
        details = info.value.details() or ""
        assert info.value.code() is grpc.StatusCode.INTERNAL, details
        assert "full" in details, details
        server.wait_for_output("cannot store the pod")
        assert peer.recv(timeout=0.5) is None  # ztunnel never heard of it
        assert server.list_pods() == []
        assert netns_state(pod) == before
    finally:
        peer.close()
