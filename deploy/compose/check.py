"""The compose ``check`` service: prove pod-to-pod traffic went through both ztunnel listeners.

It waits for the ``pods`` service to publish the enrolled pods and for ztunnel to
serve both, checks the node agent installed the redirection rules in both pods
and ztunnel listens on 15001 and 15006 in them, then, as the client pod's
application would (inside that pod's netns, as nobody, no capabilities),
connects to the server pod's application by its IPv4 and by its IPv6 address.
It exits 0 only if each echo came back byte-identical and ztunnel's per-workload
counters (``/config_dump``) show every connection went out through the client
pod's outbound listener (15001) and in through the server pod's inbound
listener (15006).

Shares ztunnel's network namespace (``network_mode: service:ztunnel``) to reach
its admin endpoint on 127.0.0.1. Needs CAP_SYS_ADMIN (enter the client pod's
netns) and CAP_SETUID/CAP_SETGID (become nobody there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from typing import Any

import scenario
from scenario import PodInfo, log

WHO = "check"
#: The whole check, set-up of the other services included, fits in this.
TIMEOUT = 240.0
PAYLOAD_SIZE = 256 * 1024
OUTBOUND, INBOUND = 15001, 15006


class CheckFailed(Exception):
    """The scenario did not do what it should; the message says what."""


def config_dump() -> dict[str, Any]:
    with urllib.request.urlopen(f"{scenario.ZTUNNEL_ADMIN}/config_dump", timeout=5) as response:
        doc: dict[str, Any] = json.load(response)
    return doc


def workloads() -> dict[str, Any]:
    state: dict[str, Any] = config_dump().get("workloadState", {})
    return state


def workloads_up(pods: list[PodInfo]) -> dict[str, Any] | None:
    state = workloads()
    if all(state.get(p.uid, {}).get("state") == "Up" for p in pods):
        return state
    return None


def counter(state: dict[str, Any], uid: str, direction: str, name: str) -> int:
    return int(state.get(uid, {}).get("traffic", {}).get(direction, {}).get(name, 0))


def listens_on(state: dict[str, Any], pod: PodInfo, port: int) -> bool:
    return any(
        str(listener.get("address", "")).endswith(f":{port}")
        for listener in state.get(pod.uid, {}).get("listeners", [])
    )


def send(client: PodInfo, host: str, port: int) -> dict[str, Any]:
    """Run the client app in ``client``'s netns, unprivileged; its JSON result."""
    argv = scenario.unprivileged(
        client.netns,
        [
            sys.executable,
            scenario.APP,
            "send",
            "--host",
            host,
            "--port",
            str(port),
            "--size",
            str(PAYLOAD_SIZE),
        ],
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    lines = done.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise CheckFailed(
            f"the client in {client.name} printed nothing usable: {done.stdout}{done.stderr}"
        ) from None
    return result


def check_rules(pods: list[PodInfo]) -> None:
    done = scenario.zds("pod", "list", "--json")
    if done.returncode != 0:
        raise CheckFailed(f"zds pod list failed: {done.stderr.strip()}")
    listed = {p["uid"]: p for p in json.loads(done.stdout)}
    for p in pods:
        if not listed.get(p.uid, {}).get("rules_installed"):
            raise CheckFailed(
                f"the node agent does not report redirection rules in pod {p.name}: {listed.get(p.uid)}"
            )
    log(WHO, "node agent: redirection rules installed in " + ", ".join(p.name for p in pods))


def check_listeners(state: dict[str, Any], client: PodInfo, server: PodInfo) -> None:
    for pod, port in ((client, OUTBOUND), (server, INBOUND)):
        if not listens_on(state, pod, port):
            raise CheckFailed(
                f"ztunnel reports no listener on {port} in pod {pod.name}: {state.get(pod.uid)}"
            )
    log(WHO, f"ztunnel: listening on {OUTBOUND} in {client.name} and on {INBOUND} in {server.name}")


def check_data_path(client: PodInfo, server: PodInfo, targets: list[str], before: dict[str, Any]) -> None:
    for host in targets:
        result = send(client, host, scenario.APP_PORT)
        if not result.get("identical"):
            raise CheckFailed(f"{client.name} -> [{host}]:{scenario.APP_PORT} failed: {result}")
        log(
            WHO,
            f"{client.name} (uid {result['uid']}, capabilities {result['capabilities']}) -> "
            f"{server.name} [{host}]:{scenario.APP_PORT}: {result['sent']} bytes sent, "
            f"{result['received']} identical bytes back in {result['seconds']}s",
        )

    def moved() -> dict[str, Any] | None:
        now = workloads()
        for uid, direction in ((client.uid, "outbound"), (server.uid, "inbound")):
            grew = counter(now, uid, direction, "connections") - counter(
                before, uid, direction, "connections"
            )
            if grew < len(targets):
                return None
        return now

    try:
        after = scenario.wait_for("ztunnel's counters", moved, 10)
    except scenario.Timeout:
        now = workloads()
        raise CheckFailed(
            "the connections did not go through both ztunnel listeners: "
            f"{client.name} traffic {now.get(client.uid, {}).get('traffic')}, "
            f"{server.name} traffic {now.get(server.uid, {}).get('traffic')}"
        ) from None
    for pod, direction, port in ((client, "outbound", OUTBOUND), (server, "inbound", INBOUND)):
        grew = {
            name: counter(after, pod.uid, direction, name) - counter(before, pod.uid, direction, name)
            for name in ("connections", "bytesSent", "bytesReceived")
        }
        log(
            WHO,
            f"ztunnel {pod.name} {direction} ({port}): +{grew['connections']} connections, "
            f"+{grew['bytesSent']} bytes sent, +{grew['bytesReceived']} bytes received",
        )
        if min(grew["bytesSent"], grew["bytesReceived"]) < PAYLOAD_SIZE * len(targets):
            raise CheckFailed(
                f"ztunnel's {direction} byte counters for {pod.name} moved less than the payloads"
            )
    log(
        WHO,
        f"PASS: pod-to-pod traffic went through ztunnel's outbound ({OUTBOUND}) and inbound ({INBOUND}) listeners",
    )


def run() -> None:
    info = scenario.wait_for(
        f"the pods service to publish {scenario.PODS_INFO}", scenario.read_pods_info, TIMEOUT
    )
    client, server = info[scenario.CLIENT_POD], info[scenario.SERVER_POD]
    log(WHO, f"pods: {client.name} {client.ipv4} {client.ipv6}; {server.name} {server.ipv4} {server.ipv6}")
    before = scenario.wait_for(
        "ztunnel to serve both pods (config_dump: Up)", lambda: workloads_up([client, server]), 60
    )
    check_rules([client, server])
    check_listeners(before, client, server)
    check_data_path(client, server, [server.ipv4, server.ipv6], before)


def main() -> int:
    try:
        run()
    except (CheckFailed, scenario.Timeout, OSError) as exc:
        log(WHO, f"FAIL: {exc}")
        try:
            log(WHO, "ztunnel config_dump:\n" + json.dumps(config_dump(), indent=2))
        except OSError as dump_exc:
            log(WHO, f"(config_dump unavailable: {dump_exc})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
