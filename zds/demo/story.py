"""The demo's story: the steps in order, and ``Demo``, which owns everything they make."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import shutil
import socket
import sys
from typing import Any

import grpc

from zds import defaults, runtime
from zds.demo.narration import Narrator
from zds.demo.probes import (
    ZTUNNEL_PORTS,
    DemoError,
    has_listeners,
    http_json,
    iptables_nat,
    listening_ports,
    no_listeners,
    wait_for,
)
from zds.demo.remains import Record, clear_earlier
from zds.demo.supervision import Supervisor
from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.netns import NetnsError
from zds.netns.apps import EchoServer, exchange, free_port
from zds.netns.podnet import PodFixture, PodNetwork

#: The pods of the story (Istio's bookinfo) and the port reviews' app listens on.
PODS = ("productpage", "reviews", "ratings")
APP_PORT = 9080
PREFIX = "zdsdemo-"
BRIDGE = "zdsdemo0"
PAYLOAD = b"hello reviews, this is productpage (through ztunnel)\n" * 20


#: Bound while a demo runs (an abstract unix socket: the kernel lets it go with the process).
CLAIM = "\0zds-demo"


def _claim() -> socket.socket:
    """One demo at a time: its namespaces, bridge and addresses have fixed names, and a second
    one took the first one's namespaces for an earlier run's leftovers (and said to delete them)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(CLAIM)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise DemoError("another zds demo is running on this machine; wait for it to end") from None
    return sock


class Demo:
    """Owns every resource the demo makes, and removes them in ``close``."""

    def __init__(self, narrator: Narrator, keep_logs: bool, subnets: tuple[str, str]) -> None:
        # The pods' network, checked before anything is made (made with the first pod).
        network = PodNetwork(BRIDGE, *subnets, made=lambda *what: self.record.made(*what))
        self.claim = _claim()
        self.n = narrator
        self.keep_logs = keep_logs
        # What an earlier demo that did not end left goes first; then this one's record of
        # what it makes, before it makes anything (``zds.demo.remains``).
        clear_earlier([PREFIX + name for name in PODS], PREFIX, BRIDGE, narrator.say)
        self.record = Record()
        self.tmp = self.record.make_tmp(keep_logs)
        self.net: PodNetwork | None = None
        self._network = network
        self.pods: dict[str, PodFixture] = {}
        self.children = Supervisor(self.tmp)
        self.app: EchoServer | None = None
        self.zds_socket = os.path.join(self.tmp, "ztunnel.sock")
        self.control_socket = os.path.join(self.tmp, "control.sock")
        self.admin = f"127.0.0.1:{free_port()}"
        self.channel: grpc.Channel | None = None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.children.stop_all()
        if self.app is not None:
            self.app.close()
        if self.net is not None:
            self.net.close()
        if self.keep_logs:
            print(f"   logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.record.done()
        self.claim.close()

    def stub(self) -> Any:
        if self.channel is None:
            self.channel = grpc.insecure_channel(
                f"unix:{self.control_socket}", defaults.CONTROL_CLIENT_OPTIONS
            )
        return nodeagent_pb2_grpc.NodeAgentStub(self.channel)  # type: ignore[no-untyped-call]

    def show_logs(self) -> None:
        self.children.show_logs(self.n)

    # -- the story -------------------------------------------------------------------
    def run(self) -> None:
        self.make_pods()
        self.start_node_agent()
        self.start_ztunnel()
        self.enroll()
        self.show_listeners()
        self.show_rules()
        self.send_traffic()
        self.remove_pods()

    def make_pods(self) -> None:
        self.n.title("Pods: network namespaces on a bridge, as a CNI would make them")
        self.net = self._network
        for name in PODS:
            pod = self.net.add_pod(PREFIX + name)
            self.pods[name] = pod
            self.n.say(f"{name:12} {pod.ipv4:15} {pod.ipv6:18} {pod.netns_path}")
        self.app = EchoServer(self.pods["reviews"].netns_path, APP_PORT)
        self.n.say(f"reviews runs an app (TCP echo) on port {APP_PORT}")

    def start_node_agent(self) -> None:
        self.n.title("Node agent: zds server")
        proc = self.children.start(
            "node-agent",
            [
                "server",
                "--zds-socket",
                self.zds_socket,
                "--control-socket",
                self.control_socket,
                "--cni-socket",
                "off",
                "--http-listen",
                "off",
                "--state-dir",  # the demo's pods are its own: not in the machine's pod store
                os.path.join(self.tmp, "state"),
                # Each ack is a debug line (as in Istio's node agent): the story shows them.
                "--log-level",
                "debug",
            ],
        )
        wait_for(
            lambda: self.children.check_alive() or os.path.exists(self.control_socket), 20, "the node agent"
        )
        self.n.say(f"pid {proc.pid}, ZDS socket {self.zds_socket}, control socket {self.control_socket}")

    def start_ztunnel(self) -> None:
        self.n.title("ztunnel side: zds ztunnel connects, says hello, takes the (empty) snapshot")
        proc = self.children.start(
            "ztunnel",
            [
                "ztunnel",
                "--zds-socket",
                self.zds_socket,
                "--admin-listen",
                self.admin,
                "--readiness-listen",
                "off",
                "--metrics-listen",
                "off",
            ],
        )
        self.n.say(f"pid {proc.pid}, admin http://{self.admin}/config_dump")
        wait_for(
            lambda: self.children.check_alive() or self.config_dump() is not None,
            20,
            "ztunnel's admin endpoint",
        )
        wait_for(self.ztunnel_connected, 20, "the ztunnel connection")
        wait_for(lambda: "snapshot reconciled" in self.children.read_log("ztunnel"), 20, "ztunnel's snapshot")
        self.show_logs()

    def ztunnel_connected(self) -> bool:
        self.children.check_alive()
        return "snapshot sent to ztunnel" in self.children.read_log("node-agent")

    def config_dump(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError):
            doc: dict[str, Any] = http_json(f"http://{self.admin}/config_dump")
            return doc
        return None

    def enroll(self) -> None:
        self.n.title("Enrolling the pods: rules in the pod, then AddWorkload + netns fd, each acked")
        stub = self.stub()
        for name, pod in self.pods.items():
            request = nodeagent_pb2.AddPodRequest(
                uid=f"demo-{name}",
                name=name,
                namespace="bookinfo",
                service_account=f"bookinfo-{name}",
                netns_path=pod.netns_path,
            )
            try:
                resp = stub.AddPod(request, timeout=30)
            except grpc.RpcError as exc:
                raise DemoError(f"enrolling {name} failed: {exc.code().name}: {exc.details()}") from exc
            self.n.ok(f"{name}: acked by ztunnel connection {resp.connection_id}")
        self.wait_for_last_ack("add")
        self.show_logs()

    def show_listeners(self) -> None:
        self.n.title("ztunnel's listeners live inside each pod's namespace, not on the host")
        wanted = ZTUNNEL_PORTS
        for name, pod in self.pods.items():
            path = pod.netns_path
            wait_for(functools.partial(has_listeners, path), 10, f"listeners in {name}")
            ports = listening_ports(path)
            shown = " ".join(str(p) for p in sorted(ports & wanted))
            self.n.say(
                f"{name:12} listening on {shown}" + (f" (and app {APP_PORT})" if APP_PORT in ports else "")
            )
        host = listening_ports(None) & wanted
        self.n.say(
            f"{'host netns':12} " + ("none of them" if not host else f"also {sorted(host)} (another process)")
        )
        dump = self.config_dump() or {}
        for uid, state in sorted(dump.get("workloadState", {}).items()):
            self.n.say(f"config_dump: {uid} is {state.get('state')}")

    def show_rules(self) -> None:
        self.n.title("The node agent's in-pod redirection rules (productpage, iptables-save -t nat)")
        for line in iptables_nat(self.pods["productpage"].netns_path):
            self.n.say(line, indent=5)

    def send_traffic(self) -> None:
        reviews = self.pods["reviews"]
        self.n.title(
            f"productpage -> reviews {reviews.ipv4}:{APP_PORT}, transparently through both listeners"
        )
        before = self.traffic()
        try:
            echoed = exchange(self.pods["productpage"].netns_path, reviews.ipv4, APP_PORT, PAYLOAD)
        except OSError as exc:
            raise DemoError(f"the connection from productpage to reviews failed: {exc}") from exc
        if echoed != PAYLOAD:
            raise DemoError(f"the echo came back different: {len(echoed)} bytes instead of {len(PAYLOAD)}")
        self.n.ok(f"sent {len(PAYLOAD)} bytes, got the same {len(echoed)} bytes back")
        after = wait_for(lambda: self._moved(before), 10, "the counters")
        out = after["demo-productpage"]["outbound"]
        inb = after["demo-reviews"]["inbound"]
        self.n.say(
            f"productpage outbound (15001): {out['connections']} connection(s), "
            f"{out['bytesSent']} bytes sent, {out['bytesReceived']} received"
        )
        self.n.say(
            f"reviews inbound (15006):      {inb['connections']} connection(s), "
            f"{inb['bytesSent']} bytes sent, {inb['bytesReceived']} received"
        )
        if self.app is not None and self.app.peers:
            self.n.say(f"reviews' app saw the connection come from {self.app.peers[-1]}")

    def traffic(self) -> dict[str, dict[str, dict[str, int]]]:
        dump = self.config_dump() or {}
        return {uid: state.get("traffic", {}) for uid, state in dump.get("workloadState", {}).items()}

    def _moved(self, before: dict[str, Any]) -> dict[str, Any] | None:
        now = self.traffic()

        def conns(doc: dict[str, Any], uid: str, role: str) -> int:
            return int(doc.get(uid, {}).get(role, {}).get("connections", 0))

        done = conns(now, "demo-productpage", "outbound") > conns(
            before, "demo-productpage", "outbound"
        ) and conns(now, "demo-reviews", "inbound") > conns(before, "demo-reviews", "inbound")
        return now if done else None

    def remove_pods(self) -> None:
        self.n.title("Removing the pods: rules out, then DelWorkload to every ztunnel, listeners closed")
        stub = self.stub()
        for name, pod in self.pods.items():
            resp = stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid=f"demo-{name}"), timeout=30)
            answers = ", ".join(d.error or "acked" for d in resp.deliveries) or "no ztunnel"
            self.n.ok(f"{name}: {answers}")
            path = pod.netns_path
            wait_for(functools.partial(no_listeners, path), 10, f"{name}'s listeners to close")
        left = [name for name, pod in self.pods.items() if iptables_nat(pod.netns_path)]
        self.n.say(
            "listeners closed in every pod; "
            + (f"rules still in {left}" if left else "rules removed from every pod")
        )
        self.wait_for_last_ack("del")
        self.show_logs()

    def wait_for_last_ack(self, kind: str) -> None:
        """The node agent writes its lines in batches (within 5 ms of each): wait for its line
        of the last pod's ack of ``kind`` (add, del), so that a step shows all of its lines."""
        text, uid = f"ztunnel acked {kind}", f'"uid": "demo-{list(self.pods)[-1]}"'

        def logged() -> bool:
            lines = self.children.read_log("node-agent").splitlines()
            return any(text in line and uid in line for line in lines)

        wait_for(lambda: self.children.check_alive() or logged(), 10, f"the node agent's line '{text}'")


def run_demo(args: argparse.Namespace) -> int:
    error = runtime.privilege_error("demo")
    if error:
        print(error, file=sys.stderr)
        return 1
    if shutil.which("iptables-restore") is None:
        print(
            "zds demo: iptables-restore not found; install Debian's iptables package (./dev setup does)",
            file=sys.stderr,
        )
        return 1
    narrator = Narrator(color=sys.stdout.isatty() and not args.no_color)
    print("zds demo: Istio ambient's node-level handshake (ZDS), both ends, on this machine")
    demo: Demo | None = None
    try:
        with runtime.Interrupts() as interrupts:
            with interrupts.held():
                demo = Demo(narrator, keep_logs=args.keep_logs, subnets=(args.subnet4, args.subnet6))
            try:
                demo.run()
            finally:
                # All of it, whatever comes: an interrupt waits for its end, and so does a
                # title that cannot be printed (a closed pipe: `zds demo | head`).
                with interrupts.held():
                    try:
                        narrator.title("Cleaning up: processes, pods, bridge, sockets")
                    finally:
                        demo.close()
                narrator.ok("nothing left behind")
    except KeyboardInterrupt as exc:
        print(f"\n{runtime.how_stopped(exc)}; cleaned up", file=sys.stderr)
        return runtime.interrupt_exit_code(exc)
    except (DemoError, NetnsError) as exc:
        print(f"zds demo: {exc}", file=sys.stderr)
        return 1
    print("\ndone.")
    return 0
