"""Pods from a real runtime: Podman runs zds-cni, chained into a CNI network by ``zds cni install``.

Each test gets its own Podman CNI network in a temporary conf dir (Podman is
pointed at it through its own containers.conf; the machine's /etc/cni/net.d and
/usr/lib/cni are never touched), its own ``podman system service`` (the
Docker-compatible API the node agent watches), a node agent with
``--container-engine`` and redirection rules, and ``zds ztunnel``. The
containers are real (runc, the base image tests/compose/setup.sh makes), and
everything is removed at the end, also on failure.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import pathlib
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import (
    ROOT,
    ZDS,
    NodeAgentProc,
    Pod,
    WatchStream,
    ZtunnelProc,
    free_port,
    http_get,
    listening,
    pod_ports,
    run_all,
    wait_until,
)
from zds.gen import nodeagent_pb2
from zds.netns import NetnsRef, open_netns
from zds.server.containers import NetnsMismatch, container_netns
from zds.server.netnspolicy import NetnsPolicy

pytestmark = [pytest.mark.root, pytest.mark.slow]

SETUP = ROOT / "tests" / "compose" / "setup.sh"
AMBIENT = "istio.io/dataplane-mode=ambient"
APP_PORT = 9080
#: An echo server, the app of the server containers.
ECHO = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {APP_PORT})); s.listen()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(c.recv(100)); c.close()\n"
)


def client(host: str, then_sleep: bool) -> str:
    """An app whose very first act is to connect to ``host``; it prints what came back."""
    return (
        "import socket, time\n"
        f"s = socket.create_connection(('{host}', {APP_PORT}), timeout=10)\n"
        "s.sendall(b'first words'); print('echo:', s.recv(100).decode(), flush=True)\n"
        + ("time.sleep(600)\n" if then_sleep else "")
    )


class Runtime:
    """One test's Podman: its network, its API service, its containers (all labelled)."""

    def __init__(self, tmp: pathlib.Path, setup: dict[str, str]) -> None:
        self.tmp = tmp
        self.token = uuid.uuid4().hex[:8]
        self.label = f"zds.test={self.token}"
        self.network = f"zdst-{self.token}"
        #: Every network this test made (the first one has zds-cni chained).
        self.networks = [self.network]
        #: Their subnets (the host's firewall rules for addresses in them are this test's).
        self.subnets: list[ipaddress.IPv4Network] = []
        self.image = setup["ZDS_BASE_IMAGE"]
        self.conf_dir = tmp / "net.d"
        self.bin_dir = tmp / "cni-bin"
        self.conf_dir.mkdir()
        self.bin_dir.mkdir()
        conf = tmp / "containers.conf"
        conf.write_text(
            pathlib.Path(setup["CONTAINERS_CONF"]).read_text()
            + "\n[network]\n"
            + 'network_backend = "cni"\n'
            + f'network_config_dir = "{self.conf_dir}"\n'
            + f'cni_plugin_dirs = ["{self.bin_dir}", "/usr/lib/cni", "/usr/libexec/cni", "/opt/cni/bin"]\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.api_socket = str(tmp / "podman.sock")
        self.service: subprocess.Popen[bytes] | None = None

    def podman(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *args], capture_output=True, text=True, timeout=timeout, env=self.env
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def start_service(self) -> None:
        """``podman system service`` on this test's socket: the API the node agent watches."""
        log = open(self.tmp / "podman-service.log", "ab")  # noqa: SIM115 (the process holds it)
        self.service = subprocess.Popen(
            ["podman", "system", "service", "--time", "0", f"unix://{self.api_socket}"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(lambda: os.path.exists(self.api_socket), "the podman API socket")

    def stop_service(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(30)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()
        self.service = None
        if os.path.exists(self.api_socket):
            os.unlink(self.api_socket)

    def create_network(self, name: str) -> None:
        """``podman network create`` with a random subnet of 10.200-250.x.0/24, recorded."""
        subnet = ipaddress.IPv4Network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        self.subnets.append(subnet)
        self.podman("network", "create", "--subnet", str(subnet), name)

    def add_network(self, suffix: str) -> str:
        """Another CNI network of this test's, with a subnet of its own (zds-cni not chained)."""
        name = f"{self.network}-{suffix}"
        self.networks.append(name)
        self.create_network(name)
        return name

    def run(
        self, name: str, code: str, *labels: str, check: bool = True, network: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``podman run -d`` of a python app on the test network (or ``network``)."""
        flags = [f"--label={self.label}", *(f"--label={label}" for label in labels)]
        return self.podman(
            "run", "-d", "--network", network or self.network, "--name", f"{name}-{self.token}", *flags,
            self.image, "python3", "-c", code, check=check,
        )  # fmt: skip

    def inspect(self, name: str) -> dict[str, Any]:
        doc: list[dict[str, Any]] = json.loads(self.podman("inspect", f"{name}-{self.token}").stdout)
        return doc[0]

    def netns(self, name: str) -> Pod:
        """The container's network namespace (Podman keeps it in /run/netns, as `ip netns` does)."""
        path = self.inspect(name)["NetworkSettings"]["SandboxKey"]
        return Pod(os.path.basename(path), path)

    def ip(self, name: str, network: str | None = None) -> str:
        return str(self.inspect(name)["NetworkSettings"]["Networks"][network or self.network]["IPAddress"])

    def logs(self, name: str) -> str:
        done = self.podman("logs", f"{name}-{self.token}", check=False)
        return done.stdout + done.stderr

    def cid(self, name: str) -> str:
        return str(self.inspect(name)["Id"])

    def clean(self) -> list[str]:
        """Remove every container and the network; what was left behind, if anything."""
        problems = []
        ids = self.podman("ps", "-aq", "--filter", f"label={self.label}", check=False).stdout.split()
        if ids:
            self.podman("rm", "-f", "-t", "0", *ids, check=False)
        if self.podman("ps", "-aq", "--filter", f"label={self.label}", check=False).stdout.split():
            problems.append("containers left behind")
        for network in self.networks:
            self.podman("network", "rm", "-f", network, check=False)
            if self.podman("network", "exists", network, check=False).returncode == 0:
                problems.append(f"network {network} left behind")
            # host-local IPAM's state for the network (Podman leaves it): ours, by the network's name.
            shutil.rmtree(f"/var/lib/cni/networks/{network}", ignore_errors=True)
        run_all([self.drop_firewall_rules, self.stop_service], "the runtime")
        return problems

    def drop_firewall_rules(self) -> None:
        """The CNI firewall plugin's host rules (``CNI-FORWARD``) for this test's addresses.
        A container whose ADD zds-cni refused (fail closed) leaves its two: the plugin's DEL
        takes out the addresses of the ADD's cached result, and a failed ADD caches none (so
        with any plugin chained after the firewall one, Istio's included)."""
        saved = subprocess.run(
            ["iptables-save", "-t", "filter"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        for line in saved.splitlines():
            rule = re.fullmatch(r"-A (CNI-FORWARD .*-[ds] (\d+\.\d+\.\d+\.\d+)/32 .*)", line)
            if rule and any(ipaddress.IPv4Address(rule.group(2)) in subnet for subnet in self.subnets):
                argv = ["iptables", "-t", "filter", "-D", *shlex.split(rule.group(1))]
                subprocess.run(argv, capture_output=True, timeout=30, check=True)


class Node:
    """The node: a node agent with --container-engine and redirection rules, and ztunnel."""

    def __init__(self, tmp: pathlib.Path, runtime: Runtime) -> None:
        self.tmp = tmp
        self.runtime = runtime
        self.http = f"http://127.0.0.1:{free_port()}"
        self.agent = self.start_agent()
        try:
            self.ztunnel = ZtunnelProc(self.agent.zds_socket, str(tmp / "ztunnel.log"))
        except BaseException:
            self.agent.stop()
            raise
        try:
            wait_until(lambda: self.ztunnel.ready_status() == 200, "ztunnel ready")
        except BaseException:
            self.stop()
            raise

    def start_agent(self, name: str = "server") -> NodeAgentProc:
        agent = NodeAgentProc(
            str(self.tmp),
            "--container-engine",
            self.runtime.api_socket,
            # This test's containers only: never enroll what other tests (or people) run on the machine.
            "--container-label",
            self.runtime.label,
            "--http-listen",
            self.http.removeprefix("http://"),
            name=name,
            redirect=True,
        )
        try:
            agent.wait_ready()
            wait_until(
                lambda: "listed and reconciled" in agent.output(), "the node agent to list the containers"
            )
        except BaseException:
            agent.stop()
            raise
        return agent

    def workloads(self) -> dict[str, Any]:
        state: dict[str, Any] = self.ztunnel.config_dump()["workloadState"]
        return state

    def pods(self) -> dict[str, Any]:
        return {p.uid: p for p in self.agent.list_pods()}

    def stop(self) -> None:
        run_all([self.ztunnel.stop, self.agent.stop], "the node")


@pytest.fixture
def runtime(tmp_path: pathlib.Path) -> Iterator[Runtime]:
    done = subprocess.run(["bash", str(SETUP), "engine"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"tests/compose/setup.sh engine failed:\n{done.stderr[-4000:]}"
    setup = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    rt = Runtime(tmp_path, setup)
    try:
        rt.create_network(rt.network)
        installed = subprocess.run(
            [
                *ZDS, "cni", "install", "--bin-dir", str(rt.bin_dir), "--conf-dir", str(rt.conf_dir),
                "--network", rt.network, "--cni-socket", str(tmp_path / "cni" / "pluginevent.sock"),
                "--log-file", str(tmp_path / "zds-cni.log"),
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert installed.returncode == 0, installed.stderr
        rt.start_service()
        yield rt
    finally:
        problems = rt.clean()
        assert not problems, problems


@pytest.fixture
def node(tmp_path: pathlib.Path, runtime: Runtime) -> Iterator[Node]:
    started = Node(tmp_path, runtime)
    try:
        yield started
    finally:
        started.stop()


def istio_rules(pod: Pod) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", pod.name, "iptables-save"], capture_output=True, text=True, check=True
    ).stdout
    return "\n".join(line for line in out.splitlines() if "ISTIO" in line)


def outbound(workloads: dict[str, Any], uid: str) -> int:
    return int(workloads.get(uid, {}).get("traffic", {}).get("outbound", {}).get("connections", 0))


def inbound(workloads: dict[str, Any], uid: str) -> int:
    return int(workloads.get(uid, {}).get("traffic", {}).get("inbound", {}).get("connections", 0))


def test_a_labelled_container_is_redirected_from_its_first_connection(runtime: Runtime, node: Node) -> None:
    K = nodeagent_pb2
    watch = WatchStream(
        node.agent,
        K.WatchRequest(
            kinds=[K.EVENT_KIND_MESSAGE_SENT, K.EVENT_KIND_POD_ENROLLED, K.EVENT_KIND_POD_REMOVED]
        ),
    )
    try:
        redirected_from_the_first_connection(runtime, node, watch)
    finally:
        watch.close()


def redirected_from_the_first_connection(runtime: Runtime, node: Node, watch: WatchStream) -> None:
    runtime.run("reviews", ECHO, AMBIENT, "zds.io/service-account=bookinfo-reviews")
    reviews = runtime.cid("reviews")
    # Enrolled by zds-cni's ADD, before the container started: rules in its netns, ztunnel's listeners there.
    pods = node.pods()
    assert pods[reviews].name == f"reviews-{runtime.token}" and pods[reviews].source == "cni"
    assert pods[reviews].service_account == "bookinfo-reviews" and pods[reviews].rules_installed
    netns = runtime.netns("reviews")
    assert "-A OUTPUT -j ISTIO_OUTPUT" in istio_rules(netns)
    assert set(pod_ports(netns, node.ztunnel.pid)) >= {15001, 15006, 15008}
    workload = wait_until(lambda: node.workloads().get(reviews), "ztunnel to know reviews")
    assert workload["info"]["name"] == f"reviews-{runtime.token}"

    # An app whose very first act is to connect: its connection already goes through ztunnel.
    runtime.run("productpage", client(runtime.ip("reviews"), then_sleep=True), AMBIENT)
    productpage = runtime.cid("productpage")
    wait_until(lambda: "echo: first words" in runtime.logs("productpage"), "productpage's echo")

    def counted() -> dict[str, Any] | None:
        w = node.workloads()
        return w if outbound(w, productpage) >= 1 and inbound(w, reviews) >= 1 else None

    workloads = wait_until(counted, "ztunnel's counters: productpage outbound, reviews inbound")
    assert workloads[productpage]["info"]["name"] == f"productpage-{runtime.token}"
    assert "enrolled: container productpage" in (runtime.tmp / "zds-cni.log").read_text()

    # Both sources saw each container (zds-cni's ADD, then the engine's start event): one pod, one
    # AddWorkload. Removing them ends the story: each uid's events are handled in order, so
    # any sync the start event caused is done once the removal shows.
    K = nodeagent_pb2
    runtime.podman("rm", "-f", "-t", "0", f"reviews-{runtime.token}", f"productpage-{runtime.token}")
    for uid in (reviews, productpage):
        watch.wait_for(K.EVENT_KIND_MESSAGE_SENT, uid=uid, message_type="del")
        events = [e for e in watch.live() if e.uid == uid]
        sent = [e.message_type for e in events if e.kind == K.EVENT_KIND_MESSAGE_SENT]
        assert sent == ["add", "del"], (uid, sent)
        assert [K.EventKind.Name(e.kind) for e in events if e.kind != K.EVENT_KIND_MESSAGE_SENT] == [
            "EVENT_KIND_POD_ENROLLED",
            "EVENT_KIND_POD_REMOVED",
        ], uid


def test_unlabelled_and_none_containers_stay_out_and_talk_directly(runtime: Runtime, node: Node) -> None:
    runtime.run("plainsrv", ECHO)
    runtime.run("optout", ECHO, "istio.io/dataplane-mode=none")
    runtime.run("plaincli", client(runtime.ip("plainsrv"), then_sleep=True))
    wait_until(lambda: "echo: first words" in runtime.logs("plaincli"), "the unlabelled client's echo")
    for name in ("plainsrv", "optout", "plaincli"):
        assert runtime.cid(name) not in node.pods(), name
        assert runtime.cid(name) not in node.workloads(), name
        netns = runtime.netns(name)
        assert istio_rules(netns) == "", name
        assert not any(lst.port in (15001, 15006) for lst in listening(netns.name)), name
    log = (runtime.tmp / "zds-cni.log").read_text()
    assert f"not selected: container optout-{runtime.token} is labelled istio.io/dataplane-mode=none" in log
    assert f"not selected: container plainsrv-{runtime.token} is not labelled" in log


def test_a_removed_container_takes_its_pod_rules_and_listeners_with_it(runtime: Runtime, node: Node) -> None:
    runtime.run("reviews", ECHO, AMBIENT)
    reviews, netns = runtime.cid("reviews"), runtime.netns("reviews")
    wait_until(lambda: node.workloads().get(reviews, {}).get("state") == "Up", "reviews Up in ztunnel")
    runtime.podman("rm", "-f", "-t", "0", f"reviews-{runtime.token}")
    assert reviews not in node.pods()
    wait_until(lambda: reviews not in node.workloads(), "ztunnel to drop reviews")
    assert not os.path.exists(netns.path)  # Podman deleted the netns: no rules, no listener left in it
    assert not any(lst.port in (15001, 15006, 15008) for lst in listening(None))
    assert "DEL" in (runtime.tmp / "zds-cni.log").read_text()


def test_the_node_agent_restarted_under_running_containers_reconciles_and_drops_nothing(
    runtime: Runtime, node: Node
) -> None:
    runtime.run("reviews", ECHO, AMBIENT)
    runtime.run("ratings", ECHO, AMBIENT)
    reviews, ratings = runtime.cid("reviews"), runtime.cid("ratings")
    wait_until(lambda: {reviews, ratings} <= set(node.workloads()), "both in ztunnel")
    listeners = pod_ports(runtime.netns("reviews"), node.ztunnel.pid)
    node.agent.stop()
    # While it is down: ratings goes (its DEL cannot reach the agent and still succeeds).
    runtime.podman("rm", "-f", "-t", "0", f"ratings-{runtime.token}")
    node.agent = node.start_agent("server2")
    pods = node.pods()
    assert set(pods) == {reviews}, "reconciled: the gone container's pod removed, the running one kept"
    assert pods[reviews].recovery == "restored"
    wait_until(lambda: set(node.workloads()) == {reviews}, "ztunnel to drop only ratings")
    assert node.workloads()[reviews]["state"] == "Up"
    # ztunnel never closed reviews' listeners: the same sockets.
    assert pod_ports(runtime.netns("reviews"), node.ztunnel.pid) == listeners
    runtime.run("productpage", client(runtime.ip("reviews"), then_sleep=True), AMBIENT)
    wait_until(lambda: "echo: first words" in runtime.logs("productpage"), "productpage's echo")
    wait_until(lambda: inbound(node.workloads(), reviews) >= 1, "traffic into reviews through ztunnel")


class EngineGate:
    """A socket in front of the engine's API socket that holds every connection made to it
    (accepted, nothing forwarded) until ``release``, then relays each both ways: a node agent
    up and serving that has not reached its container engine yet."""

    def __init__(self, path: str, upstream: str) -> None:
        self.path = path
        self.upstream = upstream
        self._released = threading.Event()
        self._closed = False
        self._socks: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def release(self) -> None:
        self._released.set()

    def _thread(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # (closed)
            self._socks.append(conn)
            self._thread(self._relay, conn)

    def _relay(self, conn: socket.socket) -> None:
        self._released.wait()
        if self._closed:
            return
        engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socks.append(engine)
        try:
            engine.connect(self.upstream)
        except OSError:
            return
        self._thread(_pump, engine, conn)
        _pump(conn, engine)

    def close(self) -> None:
        self._closed = True
        self._released.set()
        for sock in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # (wakes a thread blocked on it)
            sock.close()
        for thread in self._threads:
            thread.join(10)
        os.unlink(self.path)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Bytes from ``src`` to ``dst`` until either end is done."""
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)


def running(path: str) -> bool:
    """Whether a process runs the program at ``path`` (its command line names it)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if path.encode() in f.read().split(b"\0"):
                return True
    return False


def test_a_container_started_while_the_node_agent_lists_the_engine_is_enrolled(
    runtime: Runtime, node: Node
) -> None:
    """Podman does not answer the node agent's listing while a container's CNI plugins run
    (it holds the container's lock), and zds-cni's ADD waits for the container's ``create``
    event: the node agent reads events while it lists. It read them only once the listing was
    reconciled, so a container started then failed after 10 s ("unknown to the container
    engine"), with the engine up all along. Here the restarted node agent, ztunnel connected
    to it, reaches the engine only once the container's CNI plugins run (``EngineGate``): its
    session with the engine begins while zds-cni's ADD waits."""
    node.agent.stop()
    gate = EngineGate(str(node.tmp / "engine-gate.sock"), runtime.api_socket)
    try:
        node.agent = NodeAgentProc(
            str(node.tmp), "--container-engine", gate.path, "--container-label", runtime.label,
            "--http-listen", node.http.removeprefix("http://"), name="server2", redirect=True,
        ).wait_ready()  # fmt: skip
        wait_until(lambda: node.agent.connected_count() == 1, "ztunnel connected to the restarted node agent")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            starting = pool.submit(runtime.run, "reviews", ECHO, AMBIENT, check=False)
            plugin = str(runtime.bin_dir / "zds-cni")
            wait_until(lambda: running(plugin) or starting.done(), "the container's CNI plugins running")
            gate.release()
            started = starting.result(timeout=300)
        assert started.returncode == 0, started.stderr
        reviews = runtime.cid("reviews")
        pod = node.pods()[reviews]
        assert pod.source == "cni" and pod.rules_installed  # by zds-cni's ADD, with the engine's facts
        wait_until(lambda: "listed and reconciled" in node.agent.output(), "the listing")
        wait_until(lambda: node.workloads().get(reviews, {}).get("state") == "Up", "reviews Up in ztunnel")
    finally:
        node.agent.stop()
        gate.close()


def test_a_labelled_container_started_while_the_node_agent_is_down_is_enrolled_when_it_starts(
    tmp_path: pathlib.Path, runtime: Runtime
) -> None:
    """Reconcile on start, "enroll the missing": on a network without zds-cni only the engine
    source can enroll the container, and it does so from its listing."""
    plain = runtime.add_network("plain")
    runtime.run("reviews", ECHO, AMBIENT, network=plain)
    reviews, netns = runtime.cid("reviews"), runtime.netns("reviews")
    assert istio_rules(netns) == "", "nothing enrolled it before the node agent started"
    node = Node(tmp_path, runtime)  # waits for its listing to be reconciled
    try:
        pods = node.pods()
        assert set(pods) == {reviews}
        assert pods[reviews].source == "container-engine" and pods[reviews].rules_installed
        # By the reconcile of its listing, not by its start event (replayed from just before the
        # listing): enrolled before the listing was done.
        log = node.agent.output()
        enrolled = re.search(rf"pod enrolled .* uid={reviews}", log)
        assert enrolled is not None and enrolled.start() < log.index("listed and reconciled"), log
        assert pods[reviews].name == f"reviews-{runtime.token}"
        assert "-A OUTPUT -j ISTIO_OUTPUT" in istio_rules(netns)
        wait_until(lambda: node.workloads().get(reviews, {}).get("state") == "Up", "reviews Up in ztunnel")
        assert set(pod_ports(netns, node.ztunnel.pid)) >= {15001, 15006, 15008}
        # A connection into it goes through ztunnel's inbound listener in its netns.
        with socket.create_connection((runtime.ip("reviews", plain), APP_PORT), timeout=10) as conn:
            conn.sendall(b"hello")
            assert conn.recv(100) == b"hello"
        wait_until(lambda: inbound(node.workloads(), reviews) >= 1, "traffic into reviews through ztunnel")
    finally:
        node.stop()


def source_state(agent: NodeAgentProc) -> tuple[str, str]:
    """The container engine source as a new watcher sees it: (kind, detail)."""
    with agent.control() as stub:
        stream = stub.Watch(nodeagent_pb2.WatchRequest(), timeout=15)
        try:
            for event in stream:
                if event.kind == nodeagent_pb2.EVENT_KIND_CURRENT_STATE_END:
                    break
                if event.pod_source:
                    return nodeagent_pb2.EventKind.Name(event.kind), event.error
        finally:
            stream.cancel()
    return "", ""


def test_the_engine_service_stopped_and_started_is_recovered(runtime: Runtime, node: Node) -> None:
    runtime.run("reviews", ECHO, AMBIENT)
    reviews = runtime.cid("reviews")
    assert http_get(f"{node.http}/readyz")[0] == 200
    assert source_state(node.agent)[0] == "EVENT_KIND_POD_SOURCE_UP"
    runtime.stop_service()
    wait_until(lambda: http_get(f"{node.http}/readyz")[0] == 503, "/readyz to say the engine is down")
    assert "container-engine" in http_get(f"{node.http}/readyz")[1]
    kind, detail = source_state(node.agent)
    assert kind == "EVENT_KIND_POD_SOURCE_DOWN" and "next try in" in detail, detail
    # While the engine is down nobody can tell whether a new container joins: its ADD fails (fail closed).
    refused = runtime.run("latecomer", ECHO, AMBIENT, check=False)
    assert refused.returncode != 0 and "zds-cni" in refused.stderr, refused.stderr
    runtime.podman("rm", "-f", "-t", "0", f"latecomer-{runtime.token}", check=False)
    assert reviews in node.pods(), "the pods it had stay"
    runtime.start_service()
    wait_until(lambda: http_get(f"{node.http}/readyz")[0] == 200, "the node agent to reconnect", timeout=60)
    assert source_state(node.agent)[0] == "EVENT_KIND_POD_SOURCE_UP"
    runtime.run("latecomer", ECHO, AMBIENT)
    assert runtime.cid("latecomer") in node.pods()
    assert reviews in node.pods()


@contextlib.contextmanager
def bind_netns(source: str, target: pathlib.Path) -> Iterator[str]:
    """A netns file at ``target``, as Docker keeps one (a bind mount of the netns); unmounted after."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch()
    subprocess.run(["mount", "--bind", source, str(target)], check=True)
    try:
        yield str(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_docker_style_netns_outside_the_allowed_roots_is_taken_from_the_process(
    runtime: Runtime, node: Node, tmp_path: pathlib.Path
) -> None:
    """Docker's SandboxKey (/var/run/docker/netns/ID) is under no allowed root: the pod's netns
    is the container's /proc/PID/ns/net, checked to be the netns the SandboxKey names."""
    runtime.run("reviews", ECHO)  # unlabelled (zds-cni's ADD lets it start); never enrolled here
    info = runtime.inspect("reviews")  # the real inspection of a running container
    pid, podmans = int(info["State"]["Pid"]), info["NetworkSettings"]["SandboxKey"]
    policy = NetnsPolicy.for_this_node()
    # Podman's own (/run/netns/...): the engine's netns file, as before.
    found = container_netns(info, policy)
    assert found is not None and found.ref == NetnsRef.of_path(podmans)
    with open_netns(podmans) as real:
        container = real.identity
    docker_dir = tmp_path / "var" / "run" / "docker" / "netns"
    with bind_netns(podmans, docker_dir / info["Id"][:12]) as key:
        docker_info = {**info, "NetworkSettings": {**info["NetworkSettings"], "SandboxKey": key}}
        found = container_netns(docker_info, policy)
        assert found is not None and found.ref == NetnsRef.of_pid(pid) and found.identity == container
        with policy.open(found.ref) as opened:  # the node agent's policy takes it: the container's netns
            assert opened.identity == container
    # Identity-checked: a SandboxKey naming another netns than the process's is no pod.
    other = f"zdst-other-{runtime.token}"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        with bind_netns(f"/run/netns/{other}", docker_dir / "other") as key:
            docker_info = {**info, "NetworkSettings": {**info["NetworkSettings"], "SandboxKey": key}}
            with pytest.raises(NetnsMismatch, match=f"its process {pid} is in netns"):
                container_netns(docker_info, policy)
    finally:
        subprocess.run(["ip", "netns", "del", other], check=True)


def test_a_pod_from_an_event_as_istios_plugin_sends_it_is_not_the_engines_to_remove(
    runtime: Runtime, node: Node, make_pod: Any
) -> None:
    """An event without a container id (Istio's plugin's) enrolls a pod of source istio-cni,
    which names no container: the engine's reconcile, at each (re)connect, never takes it for
    a container that is gone (it removed such pods, and their rules, at every reconnect)."""
    from tests.harness import post_unix

    pod = make_pod()
    body = json.dumps({"Netns": pod.path, "PodName": "reviews", "PodNamespace": "bookinfo"}).encode()
    status, answer = post_unix(node.agent.cni_socket, "/cmdadd", body)
    assert status == 200, answer
    [enrolled] = [p for p in node.pods().values() if p.name == "reviews"]
    assert enrolled.source == "istio-cni" and istio_rules(pod)
    runtime.stop_service()
    wait_until(lambda: http_get(f"{node.http}/readyz")[0] == 503, "/readyz to say the engine is down")
    runtime.start_service()
    wait_until(lambda: http_get(f"{node.http}/readyz")[0] == 200, "the node agent to reconnect", timeout=60)
    assert enrolled.uid in node.pods() and istio_rules(pod), "the engine's reconcile removed it"
    assert "container gone or changed: removing its pod" not in node.agent.output()
