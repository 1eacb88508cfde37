"""``zds demo``: the whole story on one machine, narrated.

Pods (network namespaces on a bridge), the node agent and the ztunnel side as
real processes, enrollment over the control API, the handshake as the node
agent logs it, the listeners inside each pod, the redirection rules, one
connection from a pod to another through both ztunnel listeners with the
counters, then removal. Everything it makes is removed at the end, also on
Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from zds import runtime
from zds.errors import ZdsError
from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.netns import NetnsError, in_netns, open_netns
from zds.netns.apps import EchoServer, exchange
from zds.netns.fixtures import list_netns
from zds.netns.podnet import PodFixture, PodNetwork

#: The pods of the story (Istio's bookinfo) and the port reviews' app listens on.
PODS = ("productpage", "reviews", "ratings")
APP_PORT = 9080
PREFIX = "zdsdemo-"
BRIDGE = "zdsdemo0"
SUBNET4 = "10.177.77.0/24"
SUBNET6 = "fd00:177:77::/64"
PAYLOAD = b"hello reviews, this is productpage (through ztunnel)\n" * 20


class DemoError(ZdsError):
    """The demo cannot go on; the message says why."""


class Narrator:
    """Readable, numbered output."""

    def __init__(self, color: bool) -> None:
        self.step = 0
        self.color = color

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def title(self, text: str) -> None:
        self.step += 1
        print(f"\n{self._c('1', f'{self.step}. {text}')}", flush=True)

    def say(self, text: str, indent: int = 3) -> None:
        print(" " * indent + text, flush=True)

    def log(self, who: str, text: str) -> None:
        print(f"     {self._c('36', f'[{who}]')} {text}", flush=True)

    def ok(self, text: str) -> None:
        print(f"   {self._c('32', 'ok')} {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LogTail:
    """Reads a child's JSON log lines as they grow; shows the ones about the handshake."""

    def __init__(self, path: str, who: str) -> None:
        self.path = path
        self.who = who
        self._offset = 0

    def new_lines(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        lines = []
        for raw in data[:end].splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"msg": raw.decode(errors="replace"), "level": "info"})
        return lines

    def show(self, narrator: Narrator, keep: Callable[[dict[str, Any]], bool]) -> None:
        for line in self.new_lines():
            if keep(line):
                extra = " ".join(f"{k}={line[k]}" for k in ("uid", "pod", "conn") if k in line)
                narrator.log(self.who, f"{line.get('msg', '')}  {extra}".rstrip())


def _handshake_line(line: dict[str, Any]) -> bool:
    text = str(line.get("msg", ""))
    keys = (
        "hello",
        "snapshot",
        "acked",
        "nacked",
        "connected",
        "disconnected",
        "rules",
        "enrolled",
        "removed",
    )
    return line.get("level") in ("warning", "error") or any(k in text for k in keys)


def listening_ports(netns_path: str | None) -> set[int]:
    """TCP ports in LISTEN state in a netns (None: this process's own netns)."""

    def read() -> set[int]:
        ports = set()
        for table in ("/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A":  # TCP_LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports

    if netns_path is None:
        return read()
    with open_netns(netns_path) as ns, in_netns(ns):
        return read()


ZTUNNEL_PORTS = frozenset({15001, 15006, 15008})


def _has_listeners(path: str) -> bool:
    return listening_ports(path) >= ZTUNNEL_PORTS


def _no_listeners(path: str) -> bool:
    return not ZTUNNEL_PORTS & listening_ports(path)


def iptables_nat(netns_path: str) -> list[str]:
    with open_netns(netns_path) as ns, in_netns(ns):
        out = subprocess.run(
            ["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True
        ).stdout
    return [line for line in out.splitlines() if "ISTIO" in line and line.startswith("-A")]


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


class Demo:
    """Owns every resource the demo makes, and removes them in ``close``."""

    def __init__(self, narrator: Narrator, keep_logs: bool) -> None:
        self.n = narrator
        self.keep_logs = keep_logs
        self.tmp = tempfile.mkdtemp(prefix="zds-demo-")
        self.net: PodNetwork | None = None
        self.pods: dict[str, PodFixture] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, LogTail] = {}
        self.app: EchoServer | None = None
        self.zds_socket = os.path.join(self.tmp, "ztunnel.sock")
        self.control_socket = os.path.join(self.tmp, "control.sock")
        self.admin = f"127.0.0.1:{free_port()}"
        self.channel: grpc.Channel | None = None

    # -- resources -------------------------------------------------------------------
    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log_path = os.path.join(self.tmp, f"{name}.log")
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "zds", "--log-format", "json", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to the demo, which stops them in order
            )
        self.procs[name] = proc
        self.logs[name] = LogTail(log_path, name)
        return proc

    def check_alive(self) -> bool:
        """Raise DemoError if a child died; False otherwise (so it can start an ``or`` chain)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.read_log(name)[-2000:]
                raise DemoError(f"{name} exited with code {proc.returncode}:\n{tail}")
        return False

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.app is not None:
            self.app.close()
        if self.net is not None:
            self.net.close()
        if self.keep_logs:
            print(f"   logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def stub(self) -> Any:
        if self.channel is None:
            self.channel = grpc.insecure_channel(f"unix:{self.control_socket}")
        return nodeagent_pb2_grpc.NodeAgentStub(self.channel)  # type: ignore[no-untyped-call]

    def show_logs(self) -> None:
        for tail in self.logs.values():
            tail.show(self.n, _handshake_line)

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
        leftovers = [name for name in list_netns() if name.startswith(PREFIX)]
        if leftovers:
            raise DemoError(
                f"namespaces from an earlier demo exist: {', '.join(leftovers)}; "
                f"remove them with: zds netns delete {' '.join(leftovers)}"
            )
        self.net = PodNetwork(bridge=BRIDGE, subnet4=SUBNET4, subnet6=SUBNET6)
        for name in PODS:
            pod = self.net.add_pod(PREFIX + name)
            self.pods[name] = pod
            self.n.say(f"{name:12} {pod.ipv4:15} {pod.ipv6:18} {pod.netns_path}")
        self.app = EchoServer(self.pods["reviews"].netns_path, APP_PORT)
        self.n.say(f"reviews runs an app (TCP echo) on port {APP_PORT}")

    def start_node_agent(self) -> None:
        self.n.title("Node agent: zds server")
        proc = self.start(
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
            ],
        )
        wait_for(lambda: self.check_alive() or os.path.exists(self.control_socket), 20, "the node agent")
        self.n.say(f"pid {proc.pid}, ZDS socket {self.zds_socket}, control socket {self.control_socket}")

    def start_ztunnel(self) -> None:
        self.n.title("ztunnel side: zds ztunnel connects, says hello, takes the (empty) snapshot")
        proc = self.start(
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
        wait_for(lambda: self.check_alive() or self.config_dump() is not None, 20, "ztunnel's admin endpoint")
        wait_for(self.ztunnel_connected, 20, "the ztunnel connection")
        time.sleep(0.2)
        self.show_logs()

    def ztunnel_connected(self) -> bool:
        self.check_alive()
        return "snapshot sent to ztunnel" in self.read_log("node-agent")

    def read_log(self, name: str) -> str:
        with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
            return f.read()

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
        self.show_logs()

    def show_listeners(self) -> None:
        self.n.title("ztunnel's listeners live inside each pod's namespace, not on the host")
        wanted = ZTUNNEL_PORTS
        for name, pod in self.pods.items():
            path = pod.netns_path
            wait_for(functools.partial(_has_listeners, path), 10, f"listeners in {name}")
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
            wait_for(functools.partial(_no_listeners, path), 10, f"{name}'s listeners to close")
        left = [name for name, pod in self.pods.items() if iptables_nat(pod.netns_path)]
        self.n.say(
            "listeners closed in every pod; "
            + (f"rules still in {left}" if left else "rules removed from every pod")
        )
        self.show_logs()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    me = os.getpid()

    def handler(signum: int, frame: types.FrameType | None) -> None:
        if os.getpid() != me:
            # A forked helper (pyroute2 forks to make namespaces) must not run our cleanup.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
        with _sigterm_as_interrupt():
            demo = Demo(narrator, keep_logs=args.keep_logs)
            try:
                demo.run()
            finally:
                narrator.title("Cleaning up: processes, pods, bridge, sockets")
                demo.close()
                narrator.ok("nothing left behind")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    except (DemoError, NetnsError) as exc:
        print(f"zds demo: {exc}", file=sys.stderr)
        return 1
    print("\ndone.")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole story on this machine: pods, both ends, enrollment, traffic, cleanup",
        description="Make three pod namespaces on a bridge, start zds server and zds ztunnel, enroll the "
        "pods, show the handshake, the in-pod listeners and rules, send a connection from one pod to "
        "another through both ztunnel listeners, then remove everything (also on Ctrl-C).",
    )
    demo.add_argument("--keep-logs", action="store_true", help="keep the two processes' logs (path printed)")
    demo.add_argument("--no-color", action="store_true", help="plain output")
    demo.set_defaults(func=run_demo)
