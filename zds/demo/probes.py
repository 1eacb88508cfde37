"""What the demo looks at: ports listening in a netns, the rules in a pod, ztunnel's config_dump."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from zds import defaults, runtime
from zds.errors import ZdsError
from zds.netns import in_netns, open_netns

#: The TCP listeners ztunnel opens in each pod (15053 also takes UDP, on the pod's loopback).
ZTUNNEL_PORTS = frozenset(
    {defaults.OUTBOUND_PORT, defaults.INBOUND_PLAINTEXT_PORT, defaults.INBOUND_HBONE_PORT, defaults.DNS_PORT}
)


class DemoError(ZdsError):
    """The demo cannot go on; the message says why."""


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


def has_listeners(path: str) -> bool:
    return listening_ports(path) >= ZTUNNEL_PORTS


def no_listeners(path: str) -> bool:
    return not ZTUNNEL_PORTS & listening_ports(path)


def iptables_nat(netns_path: str) -> list[str]:
    with open_netns(netns_path) as ns, in_netns(ns):
        out = subprocess.run(
            ["iptables-save", "-t", "nat"], capture_output=True, text=True, errors="replace", check=True
        ).stdout
    return [line for line in out.splitlines() if "ISTIO" in line and line.startswith("-A")]


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` (OSError/ValueError count as not yet) until truthy; DemoError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        runtime.check_interrupted()
        with contextlib.suppress(OSError, ValueError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
