"""What a demo that did not end left behind (SIGKILL, a crash, the OOM killer), removed by
the next one once it knows that it is that demo's.

A demo writes ``RECORD`` before it makes anything: its pid and when it started, its temp
directory, and, as each pod is made, the pod's namespace by name, identity and cookie. Its
clean-up removes the record last. The next demo (holding the one-demo claim) finds the
record of a process that is gone and removes exactly what it names and is still the same
thing: a namespace of that name with the recorded identity and cookie, the pod's veth and
the bridge if ``zds netns`` made them, the temp directory (kept if ``--keep-logs`` asked
for it). A namespace of the demo's names it cannot prove it made (no record, another
identity) stays, and the demo refuses with the command that removes it by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from zds import defaults
from zds.demo.probes import DemoError
from zds.netns import NetnsError
from zds.netns.enter import netns_cookie
from zds.netns.fixtures import list_netns, netns_path
from zds.netns.handle import open_netns
from zds.netns.kernel import netns_identity_of_path
from zds.netns.podnet import delete_pod, remove_bridge_if_unused

#: Where a running demo says what it made (beside /var/run/netns: gone at a reboot with them).
RECORD = os.path.join(os.path.dirname(defaults.NETNS_RUN_DIR), "zds-demo.json")
#: The temp directories demos make (``tempfile.mkdtemp(prefix=...)``).
TMP_PREFIX = "zds-demo-"


def _started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _fingerprint(path: str) -> list[int] | None:
    """[dev, ino, cookie] of the namespace at ``path`` (cookie -1 where the kernel has none);
    None if no namespace is there."""
    identity = netns_identity_of_path(path)
    if identity is None:
        return None
    try:
        handle = open_netns(path)
    except NetnsError:
        return None
    try:
        cookie = netns_cookie(handle)
    finally:
        handle.close()
    return [identity.dev, identity.ino, -1 if cookie is None else cookie]


class Record:
    """This demo's record of what it made (``RECORD``)."""

    def __init__(self, tmp: str, keep_logs: bool) -> None:
        pid = os.getpid()
        self._doc: dict[str, Any] = {
            "pid": pid,
            "started": _started(pid),
            "tmp": tmp,
            "keep_logs": keep_logs,
            "netns": {},
        }
        self._write()

    def made(self, name: str) -> None:
        """The pod namespace ``name`` was made (and wired)."""
        fingerprint = _fingerprint(netns_path(name))
        if fingerprint is not None:
            self._doc["netns"][name] = fingerprint
            self._write()

    def done(self) -> None:
        """Everything it names is gone."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RECORD)

    def _write(self) -> None:
        partial = f"{RECORD}.{os.getpid()}"
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
            json.dump(self._doc, f)
        os.replace(partial, RECORD)


def _read() -> dict[str, Any] | None:
    """The record a demo left, if it is one (anything else at ``RECORD`` is not trusted)."""
    try:
        with open(RECORD) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not (
        isinstance(doc, dict)
        and isinstance(doc.get("pid"), int)
        and isinstance(doc.get("tmp"), str)
        and isinstance(doc.get("netns"), dict)
        and all(
            isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) for x in v)
            for v in doc["netns"].values()
        )
    ):
        return None
    return doc


def clear_earlier(names: Iterable[str], prefix: str, bridge: str, say: Callable[[str], None]) -> None:
    """Remove what a demo that did not end left, as its record names it (module docstring):
    of its pods' namespaces only those of ``names``; ``say`` what was removed. DemoError if
    namespaces named ``prefix``* stay that no record proves to be a gone demo's (they are left
    as they are)."""
    ours = set(names)
    removed: list[str] = []
    doc = _read()
    if doc is not None:
        pid = doc["pid"]
        if doc.get("started") is not None and _started(pid) == doc["started"]:
            raise DemoError(
                f"the zds demo with pid {pid} still runs (it holds its namespaces); wait for it to end"
            )
        for name, fingerprint in sorted(doc["netns"].items()):
            if name in ours and _fingerprint(netns_path(name)) == fingerprint:
                delete_pod(name)
                removed.append(name)
        if remove_bridge_if_unused(bridge):
            removed.append(f"bridge {bridge}")
        tmp = doc["tmp"]
        if (
            os.path.dirname(tmp) == tempfile.gettempdir()
            and os.path.basename(tmp).startswith(TMP_PREFIX)
            and os.path.isdir(tmp)
            and not os.path.islink(tmp)
        ):
            if doc.get("keep_logs") is True:
                removed.append(f"(its logs stay in {tmp}, as --keep-logs asked)")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RECORD)
        if removed:
            say(f"removed what an earlier demo that did not end left: {', '.join(removed)}")
    stay = [name for name in list_netns() if name.startswith(prefix)]
    if stay:
        raise DemoError(
            f"namespaces from an earlier demo exist: {', '.join(stay)}; "
            f"remove them with: zds netns delete --bridge {bridge} {' '.join(stay)}"
        )
