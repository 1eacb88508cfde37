"""What the compose scenario's one-shot ``check`` shares with the applications: where
ztunnel's admin endpoint is, which pods to expect, and a poller."""

from __future__ import annotations

import os
import time
import urllib.error
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: ztunnel's admin endpoint, seen from the ``check`` service (which shares ztunnel's netns).
ZTUNNEL_ADMIN = os.environ.get("ZTUNNEL_ADMIN", "http://127.0.0.1:15000")
#: The client pod and the server pod (compose services, labelled for the mesh).
CLIENT_POD = "productpage"
SERVER_POD = "reviews"
#: The application's port in the server pod (bookinfo's).
APP_PORT = 9080


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
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
