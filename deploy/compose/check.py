"""The compose ``check`` service: prove the labelled containers joined the mesh by themselves.

Nobody ran ``zds pod add``: the node agent saw ``productpage`` and ``reviews``
start (its container engine's events), found them labelled
``istio.io/dataplane-mode=ambient`` and enrolled each in its own network
namespace. This check reads ztunnel's ``/config_dump`` and exits 0 only when
ztunnel serves both, knows each by its container's name, and its counters show
productpage's calls (once a second, as nobody, no capabilities) went out
through ztunnel's outbound listener (15001) in productpage and in through its
inbound listener (15006) in reviews, bytes and all. It prints the workloads it
found as one JSON line (``workloads: {...}``) for whoever runs the scenario.

Shares ztunnel's network namespace (``network_mode: service:ztunnel``) to reach
its admin endpoint on 127.0.0.1; needs no privilege.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from typing import Any

import scenario
from scenario import log

WHO = "check"
#: The whole check, the other services' start included, fits in this.
TIMEOUT = 240.0
OUTBOUND, INBOUND = 15001, 15006


class CheckFailed(Exception):
    """The scenario did not do what it should; the message says what."""


def workloads() -> dict[str, Any]:
    with urllib.request.urlopen(f"{scenario.ZTUNNEL_ADMIN}/config_dump", timeout=5) as response:
        doc: dict[str, Any] = json.load(response)
    state: dict[str, Any] = doc.get("workloadState", {})
    return state


def by_service(state: dict[str, Any], service: str) -> tuple[str, dict[str, Any]] | None:
    """The workload of a compose service: its container is PROJECT_SERVICE_N (podman-compose)
    or PROJECT-SERVICE-N (docker compose), its pod name that as a DNS name."""
    pattern = re.compile(rf"(^|-){service}(-[0-9]+)?$")
    for uid, workload in state.items():
        if pattern.search(workload.get("info", {}).get("name", "")):
            return uid, workload
    return None


def counter(workload: dict[str, Any], direction: str, name: str) -> int:
    return int(workload.get("traffic", {}).get(direction, {}).get(name, 0))


def both_up() -> dict[str, tuple[str, dict[str, Any]]] | None:
    state = workloads()
    found = {s: by_service(state, s) for s in (scenario.CLIENT_POD, scenario.SERVER_POD)}
    if all(f is not None and f[1].get("state") == "Up" for f in found.values()):
        return {s: f for s, f in found.items() if f is not None}
    return None


def traffic_moved() -> dict[str, tuple[str, dict[str, Any]]] | None:
    found = both_up()
    if found is None:
        return None
    client, server = found[scenario.CLIENT_POD][1], found[scenario.SERVER_POD][1]
    if min(counter(client, "outbound", "connections"), counter(server, "inbound", "connections")) < 1:
        return None
    if min(counter(client, "outbound", "bytesSent"), counter(server, "inbound", "bytesReceived")) < 1:
        return None
    return found


def run() -> None:
    found = scenario.wait_for("ztunnel to serve productpage and reviews (config_dump: Up)", both_up, TIMEOUT)
    for service, (uid, workload) in found.items():
        info = workload["info"]
        log(
            WHO,
            f"ztunnel serves {service} as {info['namespace']}/{info['name']} (service account "
            f"{info['serviceAccount']}, uid {uid[:12]}), listening on "
            + ", ".join(str(lst.get("address")) for lst in workload.get("listeners", [])),
        )
    try:
        found = scenario.wait_for("productpage's calls to show in ztunnel's counters", traffic_moved, 60)
    except scenario.Timeout as exc:
        raise CheckFailed(f"{exc}: {json.dumps(workloads())}") from None
    client, server = found[scenario.CLIENT_POD][1], found[scenario.SERVER_POD][1]
    log(
        WHO,
        f"ztunnel productpage outbound ({OUTBOUND}): {counter(client, 'outbound', 'connections')} connections, "
        f"{counter(client, 'outbound', 'bytesSent')} bytes sent; reviews inbound ({INBOUND}): "
        f"{counter(server, 'inbound', 'connections')} connections, {counter(server, 'inbound', 'bytesReceived')} "
        "bytes received",
    )
    names = {s: f[1]["info"]["name"] for s, f in found.items()}
    print("workloads: " + json.dumps(names), flush=True)
    log(
        WHO,
        f"PASS: productpage -> reviews went through ztunnel's outbound ({OUTBOUND}) and inbound ({INBOUND}) listeners",
    )


def main() -> int:
    try:
        run()
    except (CheckFailed, scenario.Timeout, OSError) as exc:
        log(WHO, f"FAIL: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
