"""zds.netns fixtures: named namespaces, pods on a bridge, and ``zds netns``.

Every name is unique ("zdst-" + random), every pod subnet free (``free_subnets``), and
every test cleans up after itself,
so these run beside other tests that make namespaces and bridges.
"""

from __future__ import annotations

import gc
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from tests import harness
from tests.harness import Subnets, free_subnets, open_fds, pod_network
from zds.netns import NetnsError, NetnsIdentity, in_netns, open_netns
from zds.netns.fixtures import create_netns, delete_netns, list_netns
from zds.netns.kernel import netns_identity_of_path
from zds.netns.links import ifname_for
from zds.netns.podnet import PodFixture, PodNetwork

pytestmark = pytest.mark.root


def unique(prefix: str = "zdst-") -> str:
    return f"{prefix}{secrets.token_hex(3)}"


def host_links() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


def child_zombies() -> list[int]:
    """Our children that exited and were never reaped."""
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            zombies.append(int(entry))
    return zombies


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A unique netns name; whatever the test made under it is deleted afterwards."""
    name = unique()
    try:
        yield name
    finally:
        delete_netns(name, missing_ok=True)


@pytest.fixture
def network() -> Iterator[PodNetwork]:
    """A PodNetwork on a bridge and free subnets of its own; closed and checked empty afterwards."""
    net = pod_network(unique("zdst-br-"))
    try:
        yield net
    finally:
        made = [pod.name for pod in net.pods]
        net.close()
        assert not set(made) & set(list_netns())
        assert net.bridge not in host_links()


def serve_once(listener: socket.socket) -> tuple[threading.Thread, list[tuple[str, bytes]]]:
    """Accept one connection on ``listener`` in a host thread: record the peer, echo a line."""
    seen: list[tuple[str, bytes]] = []

    def serve() -> None:
        conn, peer = listener.accept()
        with conn:
            data = conn.recv(64)
            seen.append((peer[0], data))
            conn.sendall(b"echo " + data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, seen


# --- named namespaces --------------------------------------------------------------------


def test_create_makes_a_named_netns_with_loopback_up(netns_name: str) -> None:
    path = create_netns(netns_name)
    assert path == f"/var/run/netns/{netns_name}"
    assert netns_name in list_netns()
    with open_netns(path) as handle:
        assert handle.identity == NetnsIdentity(os.stat(path).st_dev, os.stat(path).st_ino)
        with in_netns(handle):
            # Connecting to 127.0.0.1 needs lo up (ENETUNREACH otherwise).
            with (
                socket.create_server(("127.0.0.1", 0)) as listener,
                socket.create_connection(listener.getsockname(), timeout=5),
            ):
                pass
            with IPRoute() as ipr:
                assert [link.get("ifname") for link in ipr.link("dump")] == ["lo"]


def test_each_netns_is_a_new_one(netns_name: str) -> None:
    second = unique()
    try:
        with open_netns(create_netns(netns_name)) as a, open_netns(create_netns(second)) as b:
            assert a.identity != b.identity
    finally:
        delete_netns(second, missing_ok=True)


def test_create_refuses_an_existing_name_and_leaves_it_alone(netns_name: str) -> None:
    path = create_netns(netns_name)
    before = os.stat(path).st_ino
    with pytest.raises(NetnsError) as caught:
        create_netns(netns_name)
    assert str(caught.value) == (
        f'netns {netns_name} exists already ({path}); delete it with "zds netns delete {netns_name}"'
        " or pick another name"
    )
    assert os.stat(path).st_ino == before


def test_delete_removes_it(netns_name: str) -> None:
    create_netns(netns_name)
    delete_netns(netns_name)
    assert netns_name not in list_netns()
    assert not os.path.lexists(f"/var/run/netns/{netns_name}")


def test_delete_of_a_missing_netns_is_an_error_unless_missing_ok(netns_name: str) -> None:
    with pytest.raises(NetnsError) as caught:
        delete_netns(netns_name)
    assert str(caught.value) == (
        f'cannot delete netns {netns_name}: /var/run/netns/{netns_name} does not exist; see "zds netns list"'
    )
    delete_netns(netns_name, missing_ok=True)


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "-x", "with space", "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(NetnsError, match="bad netns name"):
        create_netns(name)
    with pytest.raises(NetnsError, match="bad netns name"):
        delete_netns(name)


def test_a_stale_entry_is_named_as_such_and_can_be_deleted(netns_name: str) -> None:
    path = f"/var/run/netns/{netns_name}"
    os.makedirs("/var/run/netns", exist_ok=True)
    with open(path, "w"):
        pass  # what a crash between creating the file and mounting over it leaves
    with pytest.raises(NetnsError) as caught:
        open_netns(path)
    assert str(caught.value) == (
        f"{path} is not a network namespace;"
        f' it is a stale entry: remove it with "zds netns delete {netns_name}"'
    )
    delete_netns(netns_name)
    assert not os.path.lexists(path)


def test_create_and_delete_leak_no_fd_and_no_child(netns_name: str) -> None:
    before = open_fds()
    for _ in range(3):
        create_netns(netns_name)
        with pytest.raises(NetnsError):
            create_netns(netns_name)
        delete_netns(netns_name)
    assert open_fds() == before
    assert child_zombies() == []


async def test_create_works_from_a_running_event_loop(netns_name: str) -> None:
    # pyroute2's sync IPRoute cannot run in a thread whose loop is running.
    path = create_netns(netns_name)
    with open_netns(path):
        pass
    delete_netns(netns_name)
    assert netns_name not in list_netns()


# --- pods on a bridge ---------------------------------------------------------------------


def test_pod_network_defaults_are_the_documented_ones() -> None:
    net = PodNetwork()
    assert (net.bridge, net.gateway4, net.gateway6) == ("zds-br0", "10.177.0.1", "fd00:177::1")
    net.close()  # made nothing, so removes nothing
    assert net.pods == []


def test_add_pod_gives_addresses_from_the_subnets(network: PodNetwork) -> None:
    a = network.add_pod(unique())
    b = network.add_pod(unique())
    prefix4 = network.gateway4.rsplit(".", 1)[0]
    assert (a.ipv4, b.ipv4) == (f"{prefix4}.2", f"{prefix4}.3")
    assert (a.ipv6, b.ipv6) == (network.gateway6[:-1] + "2", network.gateway6[:-1] + "3")
    assert a.netns_path == f"/var/run/netns/{a.name}"
    assert {a.veth_host, b.veth_host, network.bridge} <= host_links()
    with open_netns(a.netns_path) as handle, in_netns(handle):
        assert sorted(name for _, name in socket.if_nameindex()) == ["eth0", "lo"]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_two_pods_reach_each_other_over_tcp(network: PodNetwork, family: socket.AddressFamily) -> None:
    client_pod, server_pod = network.add_pod(unique()), network.add_pod(unique())

    def address(pod: PodFixture) -> str:
        return pod.ipv4 if family == socket.AF_INET else pod.ipv6

    with open_netns(server_pod.netns_path) as handle, in_netns(handle):
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((address(server_pod), 0))
        listener.listen()
    with listener:
        thread, seen = serve_once(listener)  # served from a host thread
        with open_netns(client_pod.netns_path) as handle, in_netns(handle):
            client = socket.create_connection((address(server_pod), listener.getsockname()[1]), timeout=5)
        with client:
            client.sendall(b"hello")
            assert client.recv(64) == b"echo hello"
        thread.join(5)
    assert seen == [(address(client_pod), b"hello")]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_pods_reach_the_host_through_the_bridge(network: PodNetwork, family: socket.AddressFamily) -> None:
    pod = network.add_pod(unique())
    gateway = network.gateway4 if family == socket.AF_INET else network.gateway6
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((gateway, 0))
        listener.listen()
        thread, seen = serve_once(listener)
        with open_netns(pod.netns_path) as handle, in_netns(handle):
            client = socket.create_connection((gateway, listener.getsockname()[1]), timeout=5)
        with client:
            client.sendall(b"up")
            assert client.recv(64) == b"echo up"
        thread.join(5)
    assert seen == [(pod.ipv4 if family == socket.AF_INET else pod.ipv6, b"up")]


def test_remove_pod_takes_its_netns_and_veth_and_frees_its_address(network: PodNetwork) -> None:
    a = network.add_pod(unique())
    b = network.add_pod(unique())
    network.remove_pod(a.name)
    assert a.name not in list_netns()
    assert a.veth_host not in host_links()
    assert [pod.name for pod in network.pods] == [b.name]
    c = network.add_pod(unique())
    assert c.ipv4 == a.ipv4
    with pytest.raises(NetnsError, match=f"no pod {a.name} in this PodNetwork"):
        network.remove_pod(a.name)


def test_long_pod_names_get_short_interface_names(network: PodNetwork) -> None:
    first = network.add_pod(unique("zdst-a-very-long-pod-name-"))
    second = network.add_pod(unique("zdst-a-very-long-pod-name-"))
    assert len(first.veth_host) <= 15 and len(second.veth_host) <= 15
    assert first.veth_host != second.veth_host
    assert {first.veth_host, second.veth_host} <= host_links()


def test_close_removes_every_pod_veth_and_the_bridge_and_is_idempotent() -> None:
    net = pod_network(unique("zdst-br-"))
    try:
        pods = [net.add_pod(unique()) for _ in range(3)]
        assert net.bridge in host_links()
    finally:
        net.close()
    assert not {pod.name for pod in pods} & set(list_netns())
    assert not ({net.bridge} | {pod.veth_host for pod in pods}) & host_links()
    assert net.pods == []
    net.close()


def test_close_leaves_a_netns_someone_made_under_a_pods_name_since() -> None:
    net = pod_network(unique("zdst-br-"))
    try:
        pod = net.add_pod(unique())
        delete_netns(pod.name)  # the pod's name taken away, and given to a namespace of someone else's
        create_netns(pod.name)
        theirs = netns_identity_of_path(pod.netns_path)
    finally:
        net.close()
    try:
        assert theirs is not None and netns_identity_of_path(pod.netns_path) == theirs
        assert net.bridge not in host_links()
    finally:
        delete_netns(pod.name, missing_ok=True)


def test_context_manager_closes() -> None:
    with pod_network(unique("zdst-br-")) as net:
        pod = net.add_pod(unique())
    assert pod.name not in list_netns()
    assert not {net.bridge, pod.veth_host} & host_links()


def test_a_pod_network_cycle_leaks_no_fd_no_child_and_no_exit_hook() -> None:
    net = pod_network(unique("zdst-br-"))  # (reads the host's addresses: before the fds are counted)
    before = open_fds()
    with net:
        net.remove_pod(net.add_pod(unique()).name)
        net.add_pod(unique())
    assert open_fds() == before
    assert child_zombies() == []
    # close() took back its exit hook: nothing holds the network any more.
    gone = weakref.ref(net)
    del net
    gc.collect()
    assert gone() is None


def test_a_pod_network_left_open_is_removed_at_exit_even_after_an_error() -> None:
    bridge, pod = unique("zdst-br-"), unique()
    subnets = free_subnets()
    script = textwrap.dedent(
        f"""
        from zds.netns.podnet import PodNetwork
        net = PodNetwork({bridge!r}, {subnets.v4!r}, {subnets.v6!r})
        net.add_pod({pod!r})
        print("made", flush=True)
        raise SystemExit("crash before close()")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout == "made\n", result.stderr
    assert result.returncode == 1
    assert pod not in list_netns()
    assert not {bridge, f"zv-{pod}"} & host_links()


def test_add_pod_refuses_an_existing_netns_and_leaves_it_alone(network: PodNetwork, netns_name: str) -> None:
    path = create_netns(netns_name)
    links = host_links()
    with pytest.raises(NetnsError, match=f"netns {netns_name} exists already"):
        network.add_pod(netns_name)
    assert os.path.lexists(path)
    assert host_links() - links <= {network.bridge}
    assert network.pods == []


def test_a_failed_add_pod_undoes_what_it_made(network: PodNetwork) -> None:
    name = unique()
    veth = f"zv-{name}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=veth, kind="bridge")  # takes the name the pod's veth would get
    try:
        with pytest.raises(NetnsError, match=f"cannot create veth {veth} for pod {name}"):
            network.add_pod(name)
        assert name not in list_netns()  # the netns made before the veth failed is gone
        assert veth in host_links()  # and what was not ours is untouched
        assert network.pods == []
        assert network.add_pod(unique()).ipv4.endswith(".2")  # its address was not used up
    finally:
        with IPRoute() as ipr:
            ipr.link("del", ifname=veth)


def test_an_existing_bridge_is_refused_and_left_alone() -> None:
    bridge = unique("zdst-br-")
    with IPRoute() as ipr:
        ipr.link("add", ifname=bridge, kind="bridge")
    try:
        net = pod_network(bridge)
        name = unique()
        with pytest.raises(NetnsError, match=f"bridge {bridge} exists already"):
            net.add_pod(name)
        net.close()
        assert name not in list_netns()
        assert bridge in host_links()
    finally:
        with IPRoute() as ipr:
            ipr.link("del", ifname=bridge)


def test_pod_names_must_be_unique_within_a_network(network: PodNetwork) -> None:
    pod = network.add_pod(unique())
    with pytest.raises(NetnsError, match=f"pod {pod.name} exists already in this PodNetwork"):
        network.add_pod(pod.name)


@pytest.mark.parametrize(
    ("bridge", "subnet4", "subnet6"),
    [
        ("a-name-far-too-long", "10.1.0.0/24", "fd00:1::/64"),
        ("br", "not-a-subnet", "fd00:1::/64"),
        ("br", "10.1.0.0/24", "10.2.0.0/24"),
        ("br", "10.1.0.1/24", "fd00:1::/64"),
        ("br", "10.1.0.0/31", "fd00:1::/64"),
    ],
)
def test_bad_pod_network_settings_are_refused(bridge: str, subnet4: str, subnet6: str) -> None:
    with pytest.raises(NetnsError, match=r"bad bridge name|bad pod subnet|too small"):
        PodNetwork(bridge, subnet4, subnet6)


async def test_pod_network_works_from_a_running_event_loop(network: PodNetwork) -> None:
    pod = network.add_pod(unique())
    assert pod.name in list_netns()
    network.remove_pod(pod.name)
    assert pod.name not in list_netns()


# --- zds netns ------------------------------------------------------------------------------


def run_zds(zds_cmd: list[str], *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *zds_cmd, *args], capture_output=True, text=True, timeout=60)


def test_cli_create_list_delete(zds_cmd: list[str], netns_name: str) -> None:
    created = run_zds(zds_cmd, "netns", "create", netns_name)
    assert created.returncode == 0, created.stderr
    assert created.stdout == f"/var/run/netns/{netns_name}\n"

    listed = run_zds(zds_cmd, "netns", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = {entry["name"]: entry for entry in json.loads(listed.stdout)}
    st = os.stat(f"/var/run/netns/{netns_name}")
    assert entries[netns_name] == {
        "name": netns_name,
        "path": f"/var/run/netns/{netns_name}",
        "identity": f"{st.st_dev}:{st.st_ino}",
        "addresses": [],  # a bare namespace: no eth0
    }

    table = run_zds(zds_cmd, "netns", "list")
    assert table.stdout.splitlines()[0].split() == ["NAME", "PATH", "IDENTITY", "ADDRESSES"]
    assert [netns_name, f"/var/run/netns/{netns_name}", f"{st.st_dev}:{st.st_ino}", "-"] in [
        line.split() for line in table.stdout.splitlines()
    ]

    deleted = run_zds(zds_cmd, "netns", "delete", netns_name)
    assert deleted.returncode == 0, deleted.stderr
    assert netns_name not in list_netns()


def test_cli_errors_are_one_line_and_exit_1(zds_cmd: list[str], netns_name: str) -> None:
    create_netns(netns_name)
    again = run_zds(zds_cmd, "netns", "create", netns_name)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1
    assert f"netns {netns_name} exists already" in again.stderr

    missing = unique()
    gone = run_zds(zds_cmd, "netns", "delete", missing)
    assert gone.returncode == 1
    assert gone.stderr.count("\n") == 1
    assert f"cannot delete netns {missing}" in gone.stderr
    assert run_zds(zds_cmd, "netns", "delete", "--missing-ok", missing).returncode == 0


@pytest.mark.parametrize("command", ["create", "delete"])
def test_cli_without_privilege_says_which_capabilities_are_missing(
    zds_cmd: list[str], netns_name: str, command: str
) -> None:
    # Still uid 0, but exec'd with CAP_SYS_ADMIN and CAP_NET_ADMIN out of the bounding set.
    unprivileged = ("setpriv", "--bounding-set=-sys_admin,-net_admin")
    if command == "delete":
        create_netns(netns_name)
    result = run_zds(zds_cmd, "netns", command, netns_name, prefix=unprivileged)
    assert result.returncode == 1
    assert result.stderr == (
        f"zds netns {command}: needs root or CAP_SYS_ADMIN + CAP_NET_ADMIN;"
        " missing CAP_SYS_ADMIN, CAP_NET_ADMIN\n"
    )
    assert (netns_name in list_netns()) == (command == "delete")


@pytest.mark.root
def test_a_netns_interrupted_while_it_is_made_is_not_left_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM, taken as it) after the child had bind-mounted the new netns left
    its entry for good, loopback down (the next demo then refused to start)."""
    from pyroute2.process import ChildProcess

    from zds.netns import fixtures

    class Interrupted(ChildProcess):  # type: ignore[misc]  # pyroute2 is untyped
        def communicate(self, *args: object, **kwargs: object) -> object:
            super().communicate(*args, **kwargs)  # the netns is made and mounted ...
            raise KeyboardInterrupt  # ... and then the interrupt comes

    monkeypatch.setattr(fixtures, "ChildProcess", Interrupted)
    name = f"zdst-int-{secrets.token_hex(4)}"
    try:
        with pytest.raises(KeyboardInterrupt):
            create_netns(name)
        assert name not in list_netns()
        assert not os.path.lexists(f"/var/run/netns/{name}")
    finally:
        delete_netns(name, missing_ok=True)


def test_a_bridge_left_behind_is_said_as_such_not_as_a_subnet_in_use() -> None:
    """A bridge of the same name with the gateway address (a killed demo's zdsdemo0): the
    subnet check took its address for someone else's and said to pick other subnets (the demo
    has no such flags); it is the bridge that is in the way, and the message says so."""
    bridge = unique("zdst-br-")[:15]
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        subnets = free_subnets()
        subprocess.run(["ip", "addr", "add", f"{subnets.ip4(1)}/24", "dev", bridge], check=True)
        net = PodNetwork(bridge, *subnets)
        with pytest.raises(
            NetnsError, match=rf"^bridge {bridge} exists already: .* delete that link if it is stale"
        ):
            net.add_pod(unique())
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=False)


# --- free pod subnets (tests/harness.py) ---------------------------------------------------------


class Scripted(random.Random):
    """A random source that draws ``picks``' A and B (10.A.B.0/24), in turn."""

    def __init__(self, *picks: Subnets) -> None:
        super().__init__()
        self._draws = iter([int(part) for pick in picks for part in pick.v4.split(".")[1:3]])

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        drawn = next(self._draws, None)
        assert drawn is not None, "free_subnets drew past the scripted picks"
        return drawn


def test_subnets_name_their_nth_addresses() -> None:
    subnets = Subnets("10.180.5.0/24", "fd00:180:5::/64")
    assert (subnets.ip4(1), subnets.ip4(2), subnets.ip6(1), subnets.ip6(255)) == (
        "10.180.5.1",
        "10.180.5.2",
        "fd00:180:5::1",
        "fd00:180:5::ff",
    )


@pytest.mark.parametrize("what", ["ipv4 /32", "ipv4 /24", "ipv6 /128", "ipv4 route"])
def test_free_subnets_leaves_out_a_subnet_the_host_has_on_a_link(
    what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address (or a route) in a subnet, on a link of this host: that subnet drawn first
    is passed over for the next one drawn (fixed subnets were taken though in use, e.g. by a
    bridge a killed run left)."""
    monkeypatch.setattr(harness, "_HANDED_OUT", set())
    taken, other = free_subnets(), free_subnets()
    monkeypatch.setattr(harness, "_HANDED_OUT", set())  # (both may be handed out again)
    link = unique("zdst-fs-")
    subprocess.run(["ip", "link", "add", link, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        command = {
            "ipv4 /32": ["addr", "add", f"{taken.ip4(7)}/32", "dev", link],
            "ipv4 /24": ["addr", "add", f"{taken.ip4(1)}/24", "dev", link],
            "ipv6 /128": ["addr", "add", f"{taken.ip6(7)}/128", "dev", link, "nodad"],
            "ipv4 route": ["route", "add", taken.v4, "dev", link],
        }[what]
        subprocess.run(["ip", *command], check=True)
        monkeypatch.setattr(harness, "_RANDOM", Scripted(taken, other))
        assert free_subnets() == other
    finally:
        subprocess.run(["ip", "link", "del", link], check=False)
    assert link not in host_links()


def test_free_subnets_never_hands_out_one_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "_HANDED_OUT", set())
    first, other = free_subnets(), free_subnets()
    monkeypatch.setattr(harness, "_HANDED_OUT", {first})
    monkeypatch.setattr(harness, "_RANDOM", Scripted(first, other))
    assert free_subnets() == other


def test_the_echo_app_out_of_fds_waits_between_accepts_instead_of_spinning() -> None:
    # A connection waits while the process has no fd left for it: accept fails at once
    # (EMFILE) for as long as that lasts; the app tried again at once, ~0.8 CPU.
    script = textwrap.dedent(
        """
        import os, resource, socket, time
        from zds.netns.apps import EchoServer

        class Counting:
            def __init__(self, sock):
                self.sock, self.calls = sock, 0
            def accept(self):
                self.calls += 1
                return self.sock.accept()
            def close(self):
                self.sock.close()

        app = EchoServer("/proc/self/ns/net", 0)
        port = app.sock.getsockname()[1]
        counting = app.sock = Counting(app.sock)
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        client = socket.socket()  # (takes the lowest free fd: none left for the accept)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, limits[1]))
        client.connect(("127.0.0.1", port))
        time.sleep(0.3)
        before = counting.calls
        time.sleep(1)
        during = counting.calls - before
        accepted = len(app.peers)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        client.settimeout(10)
        print(during, accepted, client.recv(16).decode())
        client.close()
        app.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    during, accepted, echoed = out.stdout.split()
    assert (accepted, echoed) == ("0", "ping")  # (out of fds, then accepted once they were there)
    assert 0 < int(during) <= 30, f"{during} accepts in 1 s out of fds (one every 0.1 s expected)"


def test_a_pod_networks_made_hook_hears_of_each_netns_before_it_has_its_name() -> None:
    """A record of what is whose (``zds demo``'s) must name each namespace before anyone can
    find it by its name: a demo killed while it made or wired a pod left a namespace its record
    did not name, and the next one refused to start."""
    heard: list[tuple[str, str, bool, object]] = []
    name = unique()
    bridge = unique("zdst-br-")

    def made(kind: str, what: str, where: str | int) -> None:
        # (a netns is heard of before it has its name, by a path that names it then; the bridge
        # before it is made, by the ifindex it is made with)
        there = os.path.exists(f"/var/run/netns/{name}") if kind == "netns" else bridge in host_links()
        heard.append((kind, what, there, netns_identity_of_path(str(where)) if kind == "netns" else where))

    net = PodNetwork(bridge, *free_subnets(), made=made)
    try:
        net.add_pod(name)
        [made_bridge, made_netns] = heard
        assert made_bridge[:3] == ("bridge", bridge, False)
        with IPRoute() as ipr:
            assert made_bridge[3] == ipr.link_lookup(ifname=bridge)[0]  # the link made since
        assert made_netns[:3] == ("netns", name, False)
        assert made_netns[3] == netns_identity_of_path(f"/var/run/netns/{name}")  # the one named since
        assert ifname_for("zv-", name) in host_links()
    finally:
        net.close()
