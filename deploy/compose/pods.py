"""The compose ``pods`` service: pod namespaces, an application in one, enrollment.

It plays the parts the container runtime, the CNI plugin and the kubelet play on
a node: it makes each pod's network namespace (a named netns in /var/run/netns,
which the compose file shares with the node agent through the host's netns
directory), wires it to a bridge with IPv4 and IPv6, starts the server pod's
application as ``nobody`` with no capabilities, and enrolls both pods through the
node agent's control socket (``zds pod add --from-file``). Once ztunnel has acked
both it publishes them in ``pods.json`` on the shared volume and waits; on
SIGTERM it removes the pods from the node agent and deletes everything it made.

Needs CAP_SYS_ADMIN (mount the netns files), CAP_NET_ADMIN (bridge, veths,
addresses, routes) and CAP_SETUID/CAP_SETGID (to start the app as nobody). The
pods themselves, and the applications in them, get no privilege at all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from typing import NoReturn

import scenario
from scenario import PodInfo, log

from zds.netns import NetnsError
from zds.netns.fixtures import delete_netns
from zds.netns.podnet import PodNetwork

WHO = "pods"
#: How long the node agent and ztunnel get to come up and ack both pods.
ENROLL_TIMEOUT = 180.0


class Stop(Exception):
    """SIGTERM or SIGINT: leave, cleaning up."""


_MAIN_PID = os.getpid()
_stopping = threading.Event()


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    if os.getpid() != _MAIN_PID:
        # A forked helper (pyroute2 forks to make a netns) must not run our cleanup.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if not _stopping.is_set():
        _stopping.set()
        raise Stop(signal.Signals(signum).name)


def node_agent_answers() -> bool:
    return os.path.exists(scenario.CONTROL_SOCKET) and scenario.zds("pod", "list").returncode == 0


def start_app(pod: PodInfo) -> subprocess.Popen[bytes]:
    argv = scenario.unprivileged(
        pod.netns,
        [sys.executable, scenario.APP, "serve", "--port", str(scenario.APP_PORT), "--stop-on-eof"],
    )
    # The app runs as nobody: we may not signal it (no CAP_KILL), so it stops when we
    # close its stdin, or when we die.
    return subprocess.Popen(argv, stdin=subprocess.PIPE)


def stop_app(app: subprocess.Popen[bytes]) -> None:
    if app.stdin is not None:
        app.stdin.close()
    try:
        app.wait(5)
    except subprocess.TimeoutExpired:
        log(WHO, f"the app (pid {app.pid}) did not stop; the container's end will stop it")


def app_listening(pid: int) -> bool:
    """Whether process ``pid`` (in the pod's netns) has the app's port in LISTEN state."""
    for table in (f"/proc/{pid}/net/tcp6", f"/proc/{pid}/net/tcp"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == scenario.APP_PORT:
                    return True
    return False


def pod_states() -> dict[str, dict[str, object]]:
    done = scenario.zds("pod", "list", "--json")
    if done.returncode != 0:
        return {}
    return {p["uid"]: p for p in json.loads(done.stdout)}


def all_acked(pods: list[PodInfo]) -> bool:
    states = pod_states()
    return all(states.get(p.uid, {}).get("state") == "POD_STATE_ACKED" for p in pods)


def enroll(pods: list[PodInfo]) -> None:
    """``zds pod add --from-file``; until ztunnel acked every pod (it may connect after us)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for p in pods:
            spec = {
                "uid": p.uid,
                "name": p.name,
                "namespace": p.namespace,
                "service_account": p.service_account,
                "netns": p.netns,
            }
            f.write(json.dumps(spec) + "\n")
    try:
        deadline = time.monotonic() + ENROLL_TIMEOUT
        while True:
            done = scenario.zds("pod", "add", "--from-file", f.name)
            for line in (done.stdout + done.stderr).splitlines():
                log(WHO, line)
            if done.returncode == 0:
                return
            # A pod that reached the node agent's cache goes out in ztunnel's snapshot
            # when ztunnel connects: wait for that a little before adding again.
            try:
                scenario.wait_for("ztunnel to ack the pods", lambda: all_acked(pods), timeout=5)
                return
            except scenario.Timeout:
                pass
            if time.monotonic() > deadline:
                raise scenario.Timeout(f"the pods were not acked within {ENROLL_TIMEOUT:g}s")
    finally:
        os.unlink(f.name)


def unpublish() -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(scenario.PODS_INFO)


def remove(pods: list[PodInfo]) -> None:
    for p in pods:
        done = scenario.zds("pod", "remove", "--uid", p.uid, timeout=15)
        text = (done.stdout + done.stderr).strip().replace("\n", "; ")
        log(WHO, f"removed {p.uid}: {text}" if done.returncode == 0 else f"removing {p.uid} failed: {text}")


def run(net: PodNetwork, made: list[PodInfo], apps: list[subprocess.Popen[bytes]]) -> None:
    log(WHO, f"waiting for the node agent's control socket {scenario.CONTROL_SOCKET}")
    scenario.wait_for("the node agent", node_agent_answers, timeout=ENROLL_TIMEOUT)
    for name in (scenario.CLIENT_POD, scenario.SERVER_POD):
        netns_name = scenario.NETNS_PREFIX + name
        delete_netns(netns_name, missing_ok=True)  # a stale one from a run that was killed
        fixture = net.add_pod(netns_name)
        made.append(
            PodInfo(
                uid=scenario.pod_uid(name),
                name=name,
                namespace=scenario.POD_NAMESPACE,
                service_account=f"{scenario.POD_NAMESPACE}-{name}",
                netns=fixture.netns_path,
                ipv4=fixture.ipv4,
                ipv6=fixture.ipv6,
            )
        )
        log(WHO, f"pod {name}: netns {fixture.netns_path}, {fixture.ipv4}, {fixture.ipv6}")
    server = next(p for p in made if p.name == scenario.SERVER_POD)
    app = start_app(server)
    apps.append(app)
    scenario.wait_for(
        f"the app in {server.name} to listen", lambda: app.poll() is None and app_listening(app.pid), 20
    )
    log(WHO, f"app in {server.name} listening on port {scenario.APP_PORT} (user nobody, no capabilities)")
    enroll(made)
    scenario.wait_for("ztunnel to ack the pods", lambda: all_acked(made), timeout=ENROLL_TIMEOUT)
    scenario.write_pods_info(made)
    log(WHO, f"both pods enrolled and acked; published {scenario.PODS_INFO}; waiting for SIGTERM")
    while True:
        if app.poll() is not None:
            raise RuntimeError(f"the app in {server.name} exited with code {app.returncode}")
        time.sleep(1)


def main() -> NoReturn:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    net = PodNetwork(bridge=scenario.BRIDGE, subnet4=scenario.SUBNET4, subnet6=scenario.SUBNET6)
    made: list[PodInfo] = []
    apps: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        run(net, made, apps)
    except Stop as stop:
        log(WHO, f"{stop}: cleaning up")
    except (scenario.Timeout, NetnsError, RuntimeError, OSError) as exc:
        log(WHO, f"failed: {exc}")
        code = 1
    finally:
        # A second signal must not cut the cleanup short.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        # Each step runs whatever the one before it did.
        steps: list[Callable[[], None]] = [unpublish]
        if made:
            steps.append(lambda: remove(made))
        steps += [functools.partial(stop_app, app) for app in apps]
        steps.append(net.close)
        clean = True
        for step in steps:
            try:
                step()
            except Exception as exc:
                log(WHO, f"cleanup: {type(exc).__name__}: {exc}")
                clean = False
        log(WHO, "pods, app, bridge and namespaces removed" if clean else "cleanup incomplete")
        code = code if clean else 1
    sys.exit(code)


if __name__ == "__main__":
    main()
