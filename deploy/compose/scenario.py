"""What the compose scenario is made of: the pods, their application, where things live.

Read by ``pods.py`` (which makes it) and ``check.py`` (which proves it carries
traffic). The socket paths match the commands in docker-compose.yml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

T = TypeVar("T")

#: The volume the services share: the node agent's sockets and the pods' description.
RUN_DIR = os.environ.get("ZDS_RUN_DIR", "/var/run/zds")
CONTROL_SOCKET = os.path.join(RUN_DIR, "control.sock")
#: Written by ``pods`` once every pod is enrolled and acked; removed when it stops.
PODS_INFO = os.path.join(RUN_DIR, "pods.json")

#: ztunnel's admin endpoint, seen from the ``check`` service (which shares ztunnel's netns).
ZTUNNEL_ADMIN = os.environ.get("ZTUNNEL_ADMIN", "http://127.0.0.1:15000")

#: Pods are named network namespaces in /var/run/netns (the host's netns directory,
#: mounted with rshared propagation), joined by a bridge in the ``pods`` service.
NETNS_PREFIX = "zds-"
BRIDGE = "zds-br0"
SUBNET4 = "10.177.0.0/24"
SUBNET6 = "fd00:177::/64"
#: (name, Kubernetes namespace): the client pod first, the server pod second.
CLIENT_POD = "productpage"
SERVER_POD = "reviews"
POD_NAMESPACE = "bookinfo"
#: The application's port in the server pod (bookinfo's).
APP_PORT = 9080
#: The application, run inside a pod as nobody with no capabilities.
APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")
NOBODY = 65534


@dataclass
class PodInfo:
    """One pod of the scenario, as ``pods`` made and enrolled it."""

    uid: str
    name: str
    namespace: str
    service_account: str
    netns: str
    ipv4: str
    ipv6: str


def pod_uid(name: str) -> str:
    return f"compose-{name}"


def write_pods_info(pods: list[PodInfo]) -> None:
    """Publish the pods atomically (``check`` polls for the file)."""
    doc = {"pods": [asdict(p) for p in pods], "app": {"pod": SERVER_POD, "port": APP_PORT}}
    tmp = PODS_INFO + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, PODS_INFO)


def read_pods_info() -> dict[str, PodInfo]:
    with open(PODS_INFO) as f:
        doc = json.load(f)
    return {p["name"]: PodInfo(**p) for p in doc["pods"]}


def unprivileged(netns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside ``netns`` as nobody, every capability dropped: how a pod's app runs."""
    return [
        "nsenter",
        f"--net={netns}",
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
        *argv,
    ]


def zds(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the zds CLI against the node agent's control socket."""
    return subprocess.run(
        [sys.executable, "-m", "zds", *args, "--control-socket", CONTROL_SOCKET],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def log(who: str, text: str) -> None:
    print(f"[{who}] {text}", flush=True)


class Timeout(Exception):
    """Something the scenario waits for did not happen in time."""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy; raise Timeout after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except (OSError, ValueError, KeyError, subprocess.SubprocessError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
