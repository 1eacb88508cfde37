"""The test harness: everything test modules share, in one place.

- paths and the golden test data;
- polling (``wait_until``, ``async_wait_until``): tests wait on a condition, never on a clock;
- fds and sockets of a process (``open_fds``, ``fd_count``, ``listening``, ...);
- free pod subnets and names no earlier run left behind (``free_subnets``, ``run_unique``);
- real ``zds`` processes (``ZdsProcess``, ``NodeAgentProc``, ``ZtunnelProc``);
- stand-ins for the other end are in ``tests/standins.py``.

Fixtures built on these live in ``tests/conftest.py``. Everything started here is
stopped by PID in ``stop()``/``close()`` (the fixtures call them, also on failure);
sockets live under the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import http.client
import ipaddress
import json
import os
import pathlib
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Protocol, TypeVar

import grpc
import pytest

from zds import runtime
from zds.check.inpod import socket_inodes
from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.netns.apps import free_port as free_port  # (the tests' name for it)
from zds.netns.fixtures import create_netns, delete_netns

if TYPE_CHECKING:
    from zds.netns.podnet import PodNetwork
    from zds.server.agent import NodeAgent

T = TypeVar("T")

#: How to run the zds CLI from tests: this interpreter, this checkout.
ZDS = [sys.executable, "-m", "zds"]

#: The repository's root, the test data copied into it, and ../shared (absent in a lone clone).
ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SHARED = ROOT.parent / "shared"

#: ztunnel's TCP listeners in a pod, and zds's DNS forwarder (TCP side; UDP beside it).
#: Literal on purpose: the tests pin what a pod sees, not what zds.defaults says.
PORTS = (15001, 15006, 15008, 15053)

#: How often the polling helpers look again.
POLL_INTERVAL = 0.02


def is_root() -> bool:
    """Tests run as root (they may make namespaces, rules, containers)."""
    return os.geteuid() == 0


def iptables_save() -> str:
    """``iptables-save`` of the current netns (call inside it)."""
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True, timeout=30).stdout


def skip_outside_ci(reason: str, *, allow_module_level: bool = False) -> NoReturn:
    """Skip (``reason``), or fail under ``CI=true``: CI has everything a test needs, so a
    skip there would hide a test that never ran."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}, and CI=true turns the skip into a failure")
    pytest.skip(reason, allow_module_level=allow_module_level)


# -- golden data -------------------------------------------------------------------------


def wire_vectors() -> list[tuple[str, str, str, bytes]]:
    """The golden wire vectors (tests/data/zds-wire.tsv): name, message, text form, bytes."""
    rows = []
    for line in (DATA / "zds-wire.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, message, text, hexbytes = line.split("\t")
        rows.append((name, message, text, bytes.fromhex(hexbytes)))
    return rows


def wire_vector(name: str) -> bytes:
    """The golden bytes of one vector, by name."""
    for row in wire_vectors():
        if row[0] == name:
            return row[3]
    raise KeyError(name)


# -- polling -----------------------------------------------------------------------------


def run_all(steps: Iterable[Callable[[], object]], what: str) -> None:
    """Run every cleanup step, whichever fails (one that raised stopped the rest: their
    namespaces and processes were left behind); then raise what failed, all of it."""
    failed: list[Exception] = []
    for step in steps:
        try:
            step()
        except Exception as exc:
            failed.append(exc)
    if failed:
        raise ExceptionGroup(f"{what}: {len(failed)} step(s) failed", failed)


def stop_cleanly(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    """Stop a process that cleans up on ``sig`` (a test that failed before signalling it; a
    kill would leave its children and namespaces): ``sig`` by its PID, a kill if it hangs."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def wait_until(
    predicate: Callable[[], T | None], what: str, timeout: float = 15.0, *, interval: float = POLL_INTERVAL
) -> T:
    """Poll ``predicate`` every ``interval`` seconds until it returns something truthy,
    and return that.

    Fails after ``timeout`` seconds, saying it was waiting for ``what``. The timeout
    only bounds a hung test: it is no assertion on how fast anything is.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def serve_agent(agent: NodeAgent, path: str) -> tuple[socket.socket, asyncio.Task[None]]:
    """Serve ``agent``'s ZDS socket at ``path`` on the running loop: its listener and the
    accept loop's task (both ended by ``stop_served_agent``)."""
    from zds.transport import bind_unix_listener

    listener = bind_unix_listener(path, mode=0o600)
    return listener, asyncio.create_task(agent.serve_zds(listener))


async def stop_served_agent(
    agent: NodeAgent, serving: asyncio.Task[None], listener: socket.socket, peers: Sequence[Any] = ()
) -> None:
    """Stop a node agent a test serves on its own loop: its peers closed first, then its accept
    loop, its listener, its connections and its telemetry."""
    from zds.aio import cancel_and_wait

    for peer in peers:
        peer.close()
    await cancel_and_wait(serving)
    listener.close()
    agent.close()
    await agent.telemetry.shutdown()


async def async_wait_until(predicate: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:  # noqa: ASYNC109 (wait_until's signature)
    """``wait_until`` for code on an event loop: the loop keeps running while we wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL)


# -- fds and sockets of a process ----------------------------------------------------------


def open_fds() -> set[int]:
    """The fds this process has open now, but eventfds: gRPC's threads, once a test of this
    process used it, replace theirs at any moment (one closed at 22, another opened at 8,
    in the middle of a test of netns fds)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]":
                continue
        except OSError:
            continue  # (closed meanwhile: the listing's own fd among them)
        found.add(int(name))
    return found


def is_open(fd: int) -> bool:
    """Whether ``fd`` is open in this process (EBADF: not; anything else is a test bug)."""
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def fd_count(pid: int) -> int:
    """Every fd of process ``pid`` (sockets included: HTTP requests to it come and go)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def signal_mask(pid: int, field: str) -> int:
    """The mask ``field`` (SigIgn, SigCgt, ...) of /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1], 16)
    raise KeyError(field)


def catches(pid: int, sig: int) -> bool:
    """Process ``pid`` has a handler of its own for ``sig`` (it is caught, not left to the default)."""
    return bool(signal_mask(pid, "SigCgt") & (1 << (sig - 1)))


def file_fd_count(pid: int) -> int:
    """The fds of ``pid`` that are not sockets: netns fds and other received files.
    Unaffected by HTTP requests, so exact at any moment."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:["):
                count += 1
    return count


def tcp_connection_count(pid: int) -> int:
    """TCP sockets of ``pid`` in its own netns that are not listening (e.g. HTTP
    requests it is serving or has not closed yet)."""
    mine = socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                listening_state = fields[3] == "0A"
                if not listening_state and int(fields[9]) in mine:
                    count += 1
    return count


def settled_fd_count(pid: int) -> int:
    """``fd_count`` once every TCP connection ``pid`` served has been closed (an HTTP
    connection just served may still be closing)."""
    wait_until(lambda: tcp_connection_count(pid) == 0, f"process {pid} to close its TCP connections")
    return fd_count(pid)


@dataclass(frozen=True)
class Listening:
    """A LISTEN socket as ``ss -ltnHe`` shows it."""

    port: int
    inode: int
    mark: int


def listening(netns: str | None) -> list[Listening]:
    """TCP listening sockets in the named netns (None: the host's); several may share a
    port (SO_REUSEPORT: two ztunnels in one pod)."""
    cmd = ["ss", "-ltnHe"]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    found: list[Listening] = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        port = int(fields[3].rsplit(":", 1)[1])
        inode = re.search(r"\bino:(\d+)", line)
        mark = re.search(r"\bfwmark:(0x[0-9a-f]+)", line)
        found.append(
            Listening(port, int(inode.group(1)) if inode else 0, int(mark.group(1), 16) if mark else 0)
        )
    return found


# -- free pod subnets and unique names ------------------------------------------------------


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 something listens on (this process) while the block runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def run_unique(prefix: str) -> str:
    """``prefix`` + this process's PID + a short random tag: a name an earlier run, killed
    before it cleaned up, cannot have left behind (a PID comes round again; the tag does not).
    Fine for a netns (up to 255 characters); a link name has 15 at most: mind the prefix."""
    return f"{prefix}{os.getpid()}-{secrets.token_hex(2)}"


class Subnets(NamedTuple):
    """A pod IPv4 /24 and IPv6 /64 that nothing on this host uses (``free_subnets``);
    ``PodNetwork(bridge, *subnets)``."""

    v4: str
    v6: str

    def ip4(self, n: int) -> str:
        """The ``n``-th address of the IPv4 subnet (1: the bridge's, the pods' gateway)."""
        return str(ipaddress.IPv4Network(self.v4)[n])

    def ip6(self, n: int) -> str:
        """The ``n``-th address of the IPv6 subnet (1: the bridge's, the pods' gateway)."""
        return str(ipaddress.IPv6Network(self.v6)[n])


#: What ``free_subnets`` draws A and B of 10.A.B.0/24 from: a generator of its own (a plugin
#: that seeds ``random`` alike in each worker cannot make two test processes draw the same
#: ones; a test can put a scripted one in its place).
_RANDOM = random.Random()

#: Subnets handed out in this process (one test's bridge may not be made yet when the next asks).
_HANDED_OUT: set[Subnets] = set()
_HANDED_OUT_LOCK = threading.Lock()

#: A route (or an address's prefix) wider than this says where the rest of a big range goes
#: (a default route, a VPN's 10.0.0.0/8, OpenVPN's 0.0.0.0/1): a pod bridge's /24 or /64 is
#: more specific and leaves it be for everything else, so it rules nothing out.
_WIDEST_COUNTED = {4: 16, 6: 32}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def host_networks() -> list[Network]:
    """What of the address space this host uses (its own netns, every table): each address of
    each link as a /32 or /128, and each address's prefix and each route's destination no
    wider than ``_WIDEST_COUNTED``."""

    def read() -> list[Network]:
        from pyroute2 import IPRoute

        found: list[Network] = []

        def add(text: object, prefixlen: int, *, exact: bool) -> None:
            if not text:
                return
            address = ipaddress.ip_address(str(text))
            if exact:
                found.append(ipaddress.ip_network(address))
            if prefixlen >= _WIDEST_COUNTED[address.version]:
                found.append(ipaddress.ip_network(f"{address}/{prefixlen}", strict=False))

        with IPRoute() as ipr:
            for entry in ipr.get_addr():
                for attr in ("IFA_LOCAL", "IFA_ADDRESS"):  # (on a point-to-point link: ours, the peer's)
                    add(entry.get_attr(attr), entry["prefixlen"], exact=True)
            for route in ipr.get_routes():  # (every table: local, main, policy routing's)
                add(route.get_attr("RTA_DST"), route["dst_len"], exact=False)
        return found

    from zds.netns.fixtures import off_event_loop

    return off_event_loop(read)  # (pyroute2's IPRoute cannot run under this thread's running loop)


def free_subnets() -> Subnets:
    """A pod IPv4 /24 and IPv6 /64, 10.A.B.0/24 and fd00:A:B::/64 (A 176-199 at random, written
    alike in both; B 0-255 at random, in hex in the IPv6 one), that overlap no address or route
    of this host (``host_networks``) and were not handed out in this process before: a bridge
    a killed run left, or a network of the user's, is never taken (``PodNetwork`` refuses a
    subnet in use on this host, and fixed subnets made tests fail for it)."""
    taken = host_networks()
    with _HANDED_OUT_LOCK:
        for _ in range(1000):
            a, b = _RANDOM.randrange(176, 200), _RANDOM.randrange(256)
            subnets = Subnets(f"10.{a}.{b}.0/24", f"fd00:{a}:{b:x}::/64")
            mine = (ipaddress.IPv4Network(subnets.v4), ipaddress.IPv6Network(subnets.v6))
            if subnets in _HANDED_OUT or any(
                net.overlaps(other) for net in mine for other in taken if net.version == other.version
            ):
                continue
            _HANDED_OUT.add(subnets)
            return subnets
    raise AssertionError(
        "no free pod subnets in 10.176-199.x.0/24 and fd00:176-199:x::/64 on this host after 1000 picks"
    )


def pod_network(bridge: str) -> PodNetwork:
    """A ``PodNetwork`` on ``bridge`` (made with its first pod) and free subnets of its own."""
    from zds.netns.podnet import PodNetwork

    return PodNetwork(bridge, *free_subnets())


@dataclass
class Pod:
    """A named test netns standing in for a pod (the ``make_pod`` fixture makes them)."""

    name: str
    path: str


def pod_ports(pod: Pod, pid: int) -> dict[int, Listening]:
    """The listeners process ``pid`` (a ztunnel) has in the pod, by port."""
    mine = socket_inodes(pid)
    return {lst.port: lst for lst in listening(pod.name) if lst.inode in mine}


_POD_NETNS: dict[str, Any] = {}


def pods_file(tmp_path: object, entries: list[dict[str, Any]]) -> str:
    """``tmp_path/pods.jsonl`` with ``entries``, one a line (``--pods``, ``--from-file``)."""
    path = os.path.join(str(tmp_path), "pods.jsonl")
    with open(path, "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
    return path


def pod_netns() -> str:
    """A named network namespace any test may enroll as a pod's, made once per test process
    (the node agent refuses the node's own netns, the one the tests run in); removed at the
    end of the session (conftest)."""
    if "path" not in _POD_NETNS:
        from zds.netns.fixtures import create_netns

        _POD_NETNS["name"] = run_unique("zds-test-")
        _POD_NETNS["path"] = create_netns(_POD_NETNS["name"])
    path: str = _POD_NETNS["path"]
    return path


def pod_netns_pid() -> int:
    """A process living in ``pod_netns()`` (for ``pid:N`` references), started once."""
    if "process" not in _POD_NETNS:
        _POD_NETNS["process"] = subprocess.Popen(
            ["ip", "netns", "exec", os.path.basename(pod_netns()), "sleep", "infinity"]
        )
        wait_until(
            lambda: (
                os.stat(f"/proc/{_POD_NETNS['process'].pid}/ns/net").st_ino == os.stat(pod_netns()).st_ino
            ),
            "the process inside the pod netns",
        )
    pid: int = _POD_NETNS["process"].pid
    return pid


def release_pod_netns() -> None:
    """Stop the pod-netns process and delete the netns (end of the session)."""
    process = _POD_NETNS.pop("process", None)
    if process is not None:
        process.kill()
        process.wait()
    name = _POD_NETNS.pop("name", None)
    _POD_NETNS.pop("path", None)
    if name is not None:
        from zds.netns.fixtures import delete_netns

        delete_netns(name, missing_ok=True)


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (Istio's CNI plugin talks to the node agent like this)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def post_unix(path: str, url: str, body: bytes) -> tuple[int, str]:
    """POST a JSON ``body`` to ``url`` over the unix socket ``path``: (status, body)."""
    conn = UnixHTTPConnection(path)
    try:
        conn.request("POST", url, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def http_post_json(url: str, body: Any) -> tuple[int, Any]:
    """POST ``body`` as JSON to ``url``: (status, the JSON answer), also for an error status."""
    return _http_json("POST", url, json.dumps(body).encode())


def http_delete_json(url: str) -> tuple[int, Any]:
    """DELETE ``url``: (status, the JSON answer), also for an error status."""
    return _http_json("DELETE", url, None)


def _http_json(method: str, url: str, data: bytes | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def http_get(url: str) -> tuple[int, str]:
    """GET ``url``: (status, body), also for an error status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- real zds processes --------------------------------------------------------------------


class Namespaces:
    """Named namespaces a test makes; every one is deleted at the end."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.names: list[str] = []

    def make(self, name: str) -> str:
        full = f"zst-{self.tag}-{name}"
        self.names.append(full)
        return create_netns(full)

    def delete(self, name: str) -> None:
        delete_netns(f"zst-{self.tag}-{name}", missing_ok=True)

    def close(self) -> None:
        run_all([functools.partial(delete_netns, name, missing_ok=True) for name in self.names], "namespaces")


def following(env: dict[str, str] | None) -> dict[str, str]:
    """``env`` (else this process's) for a zds child that ends with the test run, as ``zds
    demo``'s children end with it: a run killed (a CI timeout) left its node agents and
    ztunnel sides serving. Only from the main thread: the kernel tells the child when the
    thread that started it ends."""
    env = dict(os.environ if env is None else env)
    if threading.current_thread() is threading.main_thread():
        env[runtime.PARENT_PID_ENV] = str(os.getpid())
    return env


class ZdsProcess:
    """A ``zds ARGS`` subprocess, its output (stdout and stderr) captured to a file."""

    def __init__(
        self,
        args: Sequence[str],
        log_path: str,
        env: dict[str, str] | None = None,
        *,
        wrapper: Sequence[str] = (),
    ) -> None:
        """``wrapper``: a command that runs zds (``setpriv ...``, ``prlimit ...``); its pid is the process's."""
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*wrapper, *ZDS, *args], stdout=self._log, stderr=subprocess.STDOUT, env=following(env)
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything the process printed so far."""
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 15.0) -> None:
        """Wait until the process printed ``text``; fail at once if it exits without."""
        wait_until(
            lambda: text in self.output() or self.proc.poll() is not None, f"{text!r} in the output", timeout
        )
        assert text in self.output(), (
            f"process exited ({self.proc.returncode}) without printing {text!r}:\n{self.output()}"
        )

    def wait_exit(self, timeout: float = 15.0) -> int:
        """The exit code, once the process exits by itself."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"zds {' '.join(self.args[:1])} did not exit:\n{self.output()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process (by its PID) and reap it; kill it if it hangs. The exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class NodeAgentProc(ZdsProcess):
    """``zds server`` with every socket and its state under ``tmp`` (two of them in one
    ``tmp`` share the sockets and the pod store: a restart); redirection rules only with
    ``redirect``."""

    def __init__(
        self,
        tmp: str,
        *extra: str,
        name: str = "server",
        redirect: bool = False,
        env_path: str | None = None,
        wrapper: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: variables set for it besides this process's (``env_path``: its PATH)."""
        self.zds_socket = os.path.join(tmp, "ztunnel", "ztunnel.sock")
        self.control_socket = os.path.join(tmp, "zds", "control.sock")
        self.cni_socket = os.path.join(tmp, "cni", "pluginevent.sock")
        self.state_dir = os.path.join(tmp, "state")
        args = [
            "server",
            "--zds-socket",
            self.zds_socket,
            "--control-socket",
            self.control_socket,
            "--cni-socket",
            self.cni_socket,
            "--state-dir",
            self.state_dir,
            "--http-listen",
            "off",
            *([] if redirect else ["--no-redirect"]),
            *extra,
        ]
        environment = {**os.environ, **(env or {}), **({"PATH": env_path} if env_path is not None else {})}
        super().__init__(args, os.path.join(tmp, f"{name}.log"), environment, wrapper=wrapper)

    def wait_ready(self) -> NodeAgentProc:
        """Wait for "node agent ready"; a node agent that never says it is stopped (callers
        start it and wait in one expression, before their ``try``)."""
        try:
            self.wait_for_output("node agent ready")
        except BaseException:
            self.stop()
            raise
        return self

    def http_address(self) -> str:
        """Where its HTTP endpoints listen, as its log says (``--http-listen`` port 0: the one picked)."""
        found = re.search(r"HTTP \(/healthz, /readyz, /metrics\) listening on (\S+)", self.output())
        assert found is not None, "no HTTP endpoints in its log"
        return found[1]

    def http_get(self, path: str) -> tuple[int, str]:
        """``GET path`` on its HTTP endpoints: the status and the body (also of a 503)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_address()}{path}", timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()

    def connected_count(self) -> int | None:
        """The node agent's latest "total connected: N" (None before any)."""
        counts = re.findall(r"total connected: (\d+)", self.output())
        return int(counts[-1]) if counts else None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``zds ARGS --control-socket`` this node agent's, as a user would type it."""
        return subprocess.run(
            [*ZDS, *args, "--control-socket", self.control_socket], capture_output=True, text=True, timeout=60
        )

    @contextlib.contextmanager
    def control(self) -> Iterator[Any]:
        """A stub of the control API (zds.v1.NodeAgent) on a fresh channel."""
        with grpc.insecure_channel(f"unix:{self.control_socket}") as channel:
            yield nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]

    def add_pod(self, uid: str, netns: str, name: str = "", namespace: str = "ns", sa: str = "sa") -> Any:
        with self.control() as stub:
            return stub.AddPod(
                nodeagent_pb2.AddPodRequest(
                    uid=uid, name=name or uid, namespace=namespace, service_account=sa, netns_path=netns
                ),
                timeout=30,
            )

    def remove_pod(self, uid: str) -> Any:
        with self.control() as stub:
            return stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid=uid), timeout=30)

    def list_pods(self) -> list[Any]:
        with self.control() as stub:
            return list(stub.ListPods(nodeagent_pb2.ListPodsRequest(), timeout=30).pods)


class WatchStream:
    """A node agent's Watch stream read in a thread into a list, so tests can poll it."""

    def __init__(self, server: NodeAgentProc, request: nodeagent_pb2.WatchRequest | None = None) -> None:
        self.channel = grpc.insecure_channel(f"unix:{server.control_socket}")
        stub = nodeagent_pb2_grpc.NodeAgentStub(self.channel)  # type: ignore[no-untyped-call]
        self.call = stub.Watch(request or nodeagent_pb2.WatchRequest())
        self.events: list[nodeagent_pb2.Event] = []
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def wait_for(self, kind: int, count: int = 1, **fields: Any) -> list[nodeagent_pb2.Event]:
        def matching() -> list[nodeagent_pb2.Event]:
            return [
                e
                for e in list(self.events)
                if e.kind == kind and all(getattr(e, k) == v for k, v in fields.items())
            ]

        wait_until(lambda: len(matching()) >= count, what=f"{nodeagent_pb2.EventKind.Name(kind)} {fields}")
        return matching()

    def live(self) -> list[nodeagent_pb2.Event]:
        marker = self.wait_for(nodeagent_pb2.EVENT_KIND_CURRENT_STATE_END)[0]
        return self.events[self.events.index(marker) + 1 :]

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(5)
        self.channel.close()


class StartServer(Protocol):
    """What the ``start_server`` fixture is: start ``zds server`` with these extra flags
    (``name`` names its log; ``ready=False`` does not wait for it to be ready)."""

    def __call__(self, *extra: str, name: str = "server", ready: bool = True) -> NodeAgentProc: ...


class ZtunnelProc(ZdsProcess):
    """``zds ztunnel`` connecting to ``zds_socket``, its HTTP endpoints on ephemeral ports."""

    def __init__(
        self,
        zds_socket: str,
        log_path: str,
        *extra: str,
        fd_limit: int | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        """``fd_limit``: its RLIMIT_NOFILE (soft and hard), set with util-linux's prlimit;
        ``wrapper``: a command that runs it (``nohup``), as ``ZdsProcess``'s."""
        args = [
            "ztunnel",
            "--zds-socket",
            zds_socket,
            "--admin-listen",
            "127.0.0.1:0",
            "--readiness-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            *extra,
        ]
        limit = ["prlimit", f"--nofile={fd_limit}:{fd_limit}", "--"] if fd_limit is not None else []
        super().__init__(args, log_path, wrapper=[*wrapper, *limit])
        self._addresses: dict[str, str] = {}

    def address(self, name: str) -> str:
        """Where endpoint ``name`` (admin, readiness, metrics) listens, from the log."""
        if name not in self._addresses:

            def find() -> str | None:
                assert self.proc.poll() is None, f"zds ztunnel exited:\n{self.output()}"
                m = re.search(rf"{name} listening on (\S+)", self.output())
                return m.group(1) if m else None

            self._addresses[name] = wait_until(find, f"{name} address in the log")
        return self._addresses[name]

    def get(self, name: str, path: str) -> tuple[int, str]:
        """GET ``path`` from endpoint ``name``: (status, body)."""
        return http_get(f"http://{self.address(name)}{path}")

    def config_dump(self) -> dict[str, Any]:
        status, body = self.get("admin", "/config_dump")
        assert status == 200
        doc: dict[str, Any] = json.loads(body)
        return doc

    def workload_states(self) -> dict[str, str]:
        return {uid: w["state"] for uid, w in self.config_dump()["workloadState"].items()}

    def ready_status(self) -> int:
        return self.get("readiness", "/healthz/ready")[0]

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, by its name with labels."""
        status, body = self.get("metrics", "/metrics")
        assert status == 200
        values = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values


# -- zds check --------------------------------------------------------------------------------


@dataclass
class CheckRun:
    """One ``zds check`` run: its exit status, output and JSON report."""

    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any]

    def check(self, name: str) -> dict[str, Any]:
        for check in self.report["checks"]:
            if check["name"] == name:
                result: dict[str, Any] = check
                return result
        raise KeyError(f"no check {name} in the report:\n{self.stdout}")

    def status(self, name: str) -> str:
        return str(self.check(name)["status"])

    def findings(self, name: str) -> str:
        """Every finding of ``name`` as text (messages and details), for `in` assertions."""
        return "\n".join(
            f["message"] + "\n" + "\n".join(f.get("detail", [])) for f in self.check(name)["findings"]
        )

    def statuses(self) -> dict[str, str]:
        return {c["name"]: c["status"] for c in self.report["checks"]}


#: ``zds check ztunnel --cmd``: zds's own ztunnel side, on the ports the check gives it.
ZTUNNEL_CMD = (
    f"{sys.executable} -m zds ztunnel --zds-socket {{socket}} --admin-listen 127.0.0.1:{{admin_port}} "
    "--readiness-listen 127.0.0.1:{readiness_port} --metrics-listen 127.0.0.1:{metrics_port}"
)
#: ``zds check ztunnel``'s timings for a quick run.
FAST_CHECK = ["--timeout", "3", "--grace", "1", "--connect-timeout", "20"]


def zds_check(role: str, *args: str, tmp: pathlib.Path, timeout: float = 300) -> CheckRun:
    """Run ``zds check ROLE ARGS --json`` to the end and read its report."""
    report = tmp / f"check-{role}-{time.monotonic_ns()}.json"
    done = subprocess.run(
        [*ZDS, "check", role, *args, "--json", str(report)], capture_output=True, text=True, timeout=timeout
    )
    doc: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {"checks": []}
    return CheckRun(done.returncode, done.stdout, done.stderr, doc)


def faults_file(path: pathlib.Path, *entries: dict[str, Any]) -> str:
    """A faults file (JSON lines) for ``zds server --faults`` / ``zds ztunnel --faults``."""
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return str(path)


def peers_dir() -> pathlib.Path | None:
    """Where the upstream reference peers are built, if they are: where the bench looks for
    them (``bench/procs.py``'s ``peers_dir``)."""
    from bench.procs import peers_dir as where

    path = pathlib.Path(where())
    return path if path.is_dir() else None


def check_half_requests_bounded(
    pid: int, address: str, request: bytes, output: Callable[[], str], path: str
) -> None:
    """The HTTP endpoint at ``address`` of process ``pid`` (``output``: its log so far), given
    200 connections that send the start of ``request`` and stop: it keeps 64, each new one
    taking the place of the oldest, answers a real ``GET path`` all the same, then closes the
    64 too (they never bring a whole request), saying each in its log (zds.httpguard)."""
    host, port = address.rsplit(":", 1)
    before = fd_count(pid)
    held = hold_half_requests(host, int(port), 200, request)
    try:
        wait_until(
            lambda: "connection(s) closed to make room: 64 open already" in output(), "the line in its log"
        )
        # Once the 136 oldest are closed it has accepted all 200: what it holds now is the 64
        # newest (fewer, were some closed already), not sockets it accepted and has yet to drop.
        wait_until(lambda: sum(closed_by_peer(c) for c in held[:136]) == 136, "the oldest closed")
        assert fd_count(pid) <= before + 64 + 2
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as answer:  # (not shut out)
            assert answer.status == 200
        wait_until(lambda: all(closed_by_peer(c) for c in held), "every half request closed", timeout=20)
        assert "connection(s) closed: no request within 10s" in output()
    finally:
        for conn in held:
            conn.close()


#: How the connections of ``check_places_not_held`` wait, each after what it sent.
WAYS_OF_WAITING = ("kept-open-after-an-answer", "answers-unread", "body-awaited")


def check_places_not_held(address: str, path: str, output: Callable[[], str], *, how: str) -> None:
    """The HTTP endpoint at ``address`` (``output``: its log so far), given 70 connections that
    each brought something and now only wait, ``how``: one ``GET path`` whose answer they read
    (kept open: HTTP/1.1 keep-alive); 300 ``GET path`` at once, no answer read (a 4 KiB receive
    buffer); a ``POST path`` head whose 100-byte body never comes. Each new one takes the place
    of the one least recently in a request, cut off at once, and a real request is answered
    meanwhile (before, such connections held the 64 places, refusing every other: keep-alive's
    10 s, ~16 s for unread answers, a body's 10 s; again as often as they connected)."""
    host, port = address.rsplit(":", 1)
    request = {
        "kept-open-after-an-answer": f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n",
        "answers-unread": f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n" * 300,
        "body-awaited": f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
    }[how].encode()
    held: list[socket.socket] = []
    try:
        for _ in range(70):
            conn = socket.socket()
            held.append(conn)
            if how == "answers-unread":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.settimeout(5)
            conn.connect((host, int(port)))
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                conn.send(request)
            if how != "body-awaited":
                # (an answer in: the endpoint is past this connection's first request)
                wait_until(functools.partial(answer_waiting, conn), "a first answer")
            if how == "kept-open-after-an-answer":
                assert conn.recv(4096).startswith(b"HTTP/1.1 200 "), len(held)
        cut = held[:7]
        if how == "kept-open-after-an-answer":
            # The 6 oldest made room already; the 7th asks again, so the 8th makes the next.
            held[6].sendall(request)
            wait_until(functools.partial(answer_waiting, held[6]), "the answer to asking again")
            cut = held[:6] + held[7:8]
        if how == "body-awaited":
            time.sleep(0.3)  # (each head read, not a bound: without it a wrong guard may pass)
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as answer:
            assert answer.status == 200
        wait_until(lambda: sum(map(tcp_closed, held)) >= 7, "7 cut off")
        if how == "answers-unread":  # (which: the order their handlers last returned in)
            assert sum(map(tcp_closed, held)) == 7
        else:
            assert [tcp_closed(c) for c in held] == [c in cut for c in held]
        assert "connection(s) closed to make room: 64 open already, each the one least recently" in output()
    finally:
        for conn in held:
            conn.close()


def answer_waiting(conn: socket.socket) -> bool:
    """Whether ``conn`` (non-blocking) has something to read, left there to read."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def tcp_closed(conn: socket.socket) -> bool:
    """Whether the TCP connection of ``conn`` is no longer established (a reset, or a FIN from
    the other end), whatever it still holds unread."""
    return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED


#: ``tcpi_state`` of an established connection (linux/tcp_states.h).
TCP_ESTABLISHED = 1


def failing_ip6tables_save(directory: pathlib.Path) -> str:
    """An ``ip6tables-save`` in ``directory`` that fails as a legacy one without its table
    does; the ``PATH`` that finds it first."""
    fake = directory / "ip6tables-save"
    fake.write_text('#!/bin/sh\necho "ip6tables-save: can\'t initialize ip6tables table" >&2\nexit 1\n')
    fake.chmod(0o755)
    return f"{directory}:{os.environ['PATH']}"


def hold_half_requests(host: str, port: int, count: int, request: bytes) -> list[socket.socket]:
    """``count`` connections to ``host:port`` that each send the start of ``request`` and stop."""
    held = []
    try:
        for _ in range(count):
            conn = socket.create_connection((host, port))
            conn.sendall(request)
            held.append(conn)
    except BaseException:
        for conn in held:
            conn.close()
        raise
    return held


def closed_by_peer(conn: socket.socket) -> bool:
    """Whether the other end closed ``conn`` (EOF or a reset), without waiting."""
    conn.settimeout(0.01)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True
