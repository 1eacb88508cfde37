"""What a demo that did not end left behind (SIGKILL, a crash, the OOM killer), removed by
the next one once it knows that it is that demo's.

A demo writes ``RECORD`` before it makes anything (its pid and when it started), then as it
makes each thing: its temp directory, the bridge (name and the ifindex it is made with)
before it is made, each pod's namespace (name, identity and cookie) before it has that name. Its clean-up removes the
record last. The next demo (holding the one-demo claim) finds the record of a process that
is gone and removes exactly what it names and is still the same thing: a namespace of that
name with the recorded identity and cookie (and the pod's veth, if ``zds netns`` made it),
the bridge if it is still that link and unused (its alias not needed: it has none if its
maker died at once), the temp directory (kept if ``--keep-logs``
asked for it). A namespace of the demo's names it cannot prove it made (no record, another
identity) stays, and the demo refuses with the command that removes it by hand.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from pyroute2 import NetlinkError

from zds import defaults, runtime
from zds.demo.probes import DemoError
from zds.netns.fixtures import delete_netns, half_made, list_netns, netns_fingerprint, netns_path
from zds.netns.links import remove_bridge_if_unused
from zds.netns.podnet import delete_pod

#: Where a running demo says what it made (beside /var/run/netns: gone at a reboot with them).
RECORD = os.path.join(os.path.dirname(defaults.NETNS_RUN_DIR), "zds-demo.json")
#: The names of the temp directories demos make (``Record.make_tmp``).
TMP_PREFIX = "zds-demo-"
#: A record is small; anything bigger at ``RECORD`` is not one.
RECORD_MAX = 64 * 1024


class Record:
    """This demo's record of what it made (``RECORD``), written before anything is made and
    again before each thing is (``make_tmp``, ``made``); DemoError if it cannot be written."""

    def __init__(self) -> None:
        pid = os.getpid()
        self._doc: dict[str, Any] = {
            "pid": pid,
            "started": runtime.process_started(pid),
            "tmp": None,
            "keep_logs": False,
        }
        self._doc.update(netns={}, bridge=None)
        self._write()

    def make_tmp(self, keep_logs: bool) -> str:
        """Its temp directory, recorded before it is made (``keep_logs``: to be kept); as
        ``tempfile.mkdtemp`` makes one (a new random name, mode 0700)."""
        while True:
            path = os.path.join(tempfile.gettempdir(), TMP_PREFIX + secrets.token_hex(6))
            self._doc.update(tmp=path, keep_logs=keep_logs)
            self._write()
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            return path

    def made(self, kind: str, name: str, where: str | int) -> None:
        """``PodNetwork``'s ``made``: a pod's namespace is being made (``where`` names it, not
        yet ``name``), or the bridge is about to be (``where``: its ifindex to be)."""
        if kind == "netns":
            fingerprint = netns_fingerprint(str(where))
            if fingerprint is None:
                raise DemoError(f"cannot tell which namespace {name} is ({where}): not recorded, not made")
            self._doc["netns"][name] = fingerprint
        elif kind == "bridge" and isinstance(where, int):
            self._doc["bridge"] = [name, where]
        self._write()

    def done(self) -> None:
        """Everything it names is gone."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RECORD)

    def _write(self) -> None:
        partial = f"{RECORD}.{os.getpid()}"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(partial, flags, 0o600), "w") as f:
                json.dump(self._doc, f)
            os.replace(partial, RECORD)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise DemoError(f"cannot write its record of what it makes, {RECORD}: {exc.strerror}") from None


def _read() -> dict[str, Any] | None:
    """The record a demo left, if it is one (anything else at ``RECORD`` is not trusted: not a
    regular file, too big, not what ``Record`` writes)."""
    try:
        fd = os.open(RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with open(fd) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            doc = json.loads(f.read(RECORD_MAX + 1))
    except (OSError, ValueError, RecursionError):
        return None
    if not (
        isinstance(doc, dict)
        and all(type(doc.get(key)) is int for key in ("pid", "started"))
        and isinstance(doc.get("tmp"), str | None)
        and isinstance(doc.get("netns"), dict)
        and all(
            isinstance(v, list) and len(v) == 3 and all(type(x) is int for x in v)
            for v in doc["netns"].values()
        )
        and (
            doc.get("bridge") is None
            or (
                isinstance(doc["bridge"], list)
                and len(doc["bridge"]) == 2
                and isinstance(doc["bridge"][0], str)
                and type(doc["bridge"][1]) is int
            )
        )
    ):
        return None
    return doc


def clear_earlier(names: Iterable[str], prefix: str, bridge: str, say: Callable[[str], None]) -> None:
    """Remove what a demo that did not end left, as its record names it (module docstring):
    of its pods' namespaces only those of ``names``, the bridge only if it made it (``bridge``,
    the same link still); ``say`` what was removed. DemoError if namespaces named ``prefix``*
    stay that no record proves to be a gone demo's (they are left as they are)."""
    ours = set(names)
    _clear_partials()
    doc = _read()
    if doc is not None:
        pid = doc["pid"]
        if runtime.process_started(pid) == doc["started"]:
            raise DemoError(
                f"the zds demo with pid {pid} still runs (it holds its namespaces); wait for it to end"
            )
        try:
            removed = _remove_recorded(doc, ours, bridge)
        except (NetlinkError, OSError) as exc:  # (NetnsError: said as it is by the demo)
            raise DemoError(f"cannot remove what an earlier demo left: {exc}") from None
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


def _remove_recorded(doc: dict[str, Any], ours: set[str], bridge: str) -> list[str]:
    """What ``doc`` names and is still that thing, removed: what to say of it. A namespace
    is proven by its identity *and* its cookie (inode numbers are reused; without a cookie
    from the kernel, -1, nothing proves it)."""
    removed: list[str] = []
    for name, fingerprint in sorted(doc["netns"].items()):
        if name not in ours:
            continue
        if fingerprint[2] != -1 and netns_fingerprint(netns_path(name)) == fingerprint:
            delete_pod(name)
            removed.append(name)
        elif half_made(netns_path(name)):  # (killed between the name's file and its mount)
            delete_netns(name)
            removed.append(f"{name} (an empty entry)")
    made_bridge = doc.get("bridge")
    if (
        made_bridge is not None
        and made_bridge[0] == bridge
        and remove_bridge_if_unused(bridge, index=made_bridge[1])
    ):
        removed.append(f"bridge {bridge}")
    return removed + _clear_tmp(doc)


def _clear_partials() -> None:
    """Records a demo was killed while writing (``RECORD.PID``, the pid gone) are removed."""
    for partial in glob.glob(f"{glob.escape(RECORD)}.*"):
        pid = partial.rpartition(".")[2]
        if pid.isdigit() and runtime.process_started(int(pid)) is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)


def _clear_tmp(doc: dict[str, Any]) -> list[str]:
    """The recorded temp directory removed (kept if its demo asked to keep its logs, or if it
    is not where, and as, demos make theirs): what to say of it."""
    tmp = doc["tmp"]
    if tmp is None or not os.path.isdir(tmp) or os.path.islink(tmp):
        return []
    if os.lstat(tmp).st_uid != os.getuid():  # (its name reused by someone else since)
        return [f"(its temporary directory {tmp} stays: it is not this user's)"]
    if os.path.dirname(tmp) != tempfile.gettempdir() or not os.path.basename(tmp).startswith(TMP_PREFIX):
        return [f"(its temporary directory {tmp} stays: not a {tempfile.gettempdir()}/{TMP_PREFIX}* one)"]
    if doc.get("keep_logs") is True:
        return [f"(its logs stay in {tmp}, as --keep-logs asked)"]
    shutil.rmtree(tmp, ignore_errors=True)
    return [tmp]
