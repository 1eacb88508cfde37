"""What a ``zds check`` that did not end left behind (SIGKILL, a crash, the OOM killer),
removed by the next one (either kind) once it knows that it is that check's.

Each check keeps a record in ``RECORDS`` (one file per check, named by its pid and start
time), written before it makes anything and again before each thing is made: its temporary
directory, each pod's namespace (name, identity and cookie, before it has that name), each
ztunnel it starts (the pid of its keeper, ``zds.check.keeper``, which leads the ztunnel's
process group, and when it started). Every process of the ztunnel carries the record's token
in its environment (``PEER_ENV``). The check removes its record last, at its end.

The next check finds the records of checks that are gone (the pid gone, or another process's
since: its start time differs) and removes exactly what a record names and is still that
thing: a namespace of that name with the recorded identity and cookie (or one half made), the
temporary directory, and the processes of the recorded ztunnel's group that carry the token
(SIGKILL, each through a pidfd taken before it is looked at). A running check's record, and so
its things, are left alone; a record being cleared by another check (locked) too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import select
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable
from typing import Any

from zds import defaults, runtime
from zds.check.pods import NETNS_PREFIX, CheckSetupError
from zds.errors import ZdsError
from zds.netns.fixtures import delete_netns, half_made, netns_fingerprint, netns_path

#: Where running checks say what they made (beside /var/run/netns: gone at a reboot with them).
RECORDS = os.path.join(os.path.dirname(defaults.NETNS_RUN_DIR), "zds-check")
#: The names of the temporary directories checks make.
TMP_PREFIX = "zds-check-"
#: Set for the ztunnel a check starts, and so for all it starts: the check's record's token.
PEER_ENV = "ZDS_CHECK_PEER"
#: A record is small (a pod's namespace is ~60 bytes of it); anything bigger is not one.
RECORD_MAX = 1024 * 1024
#: How long the processes of a dead check's ztunnel get to be gone after their SIGKILL.
KILL_WAIT = 5.0

_NAME = re.compile(r"([0-9]+)-([0-9]+)\.json(\.part)?")


class CheckRecord:
    """This check's record of what it makes (module docstring); CheckSetupError if it cannot
    be written."""

    def __init__(self) -> None:
        pid = os.getpid()
        started = runtime.process_started(pid)
        self._doc: dict[str, Any] = {"pid": pid, "started": started, "token": secrets.token_hex(16)}
        self._doc.update(tmp=None, netns={}, peers=[])
        self.path = os.path.join(RECORDS, f"{pid}-{started}.json")
        _records_dir()
        self._write()

    def make_tmp(self) -> str:
        """Its temporary directory, recorded before it is made (as ``tempfile.mkdtemp`` makes one)."""
        while True:
            path = os.path.join(tempfile.gettempdir(), TMP_PREFIX + secrets.token_hex(6))
            self._doc["tmp"] = path
            self._write()
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            return path

    def netns_told(self, name: str) -> Callable[[str], None]:
        """``create_netns``'s ``told`` for namespace ``name``: recorded before it has its name."""

        def told(where: str) -> None:
            fingerprint = netns_fingerprint(where)
            if fingerprint is None:
                raise CheckSetupError(
                    f"cannot tell which namespace {name} is ({where}): not recorded, not made"
                )
            self._doc["netns"][name] = fingerprint
            self._write()

        return told

    def peer_env(self) -> dict[str, str]:
        """The environment of a ztunnel the check starts: its token with it."""
        return {**os.environ, PEER_ENV: self._doc["token"]}

    def peer_started(self, keeper: int) -> None:
        """A ztunnel was started, its keeper ``keeper`` leading its process group."""
        started = runtime.process_started(keeper)
        self._doc["peers"].append([keeper, -1 if started is None else started])  # (-1: ended already)
        self._write()

    def done(self) -> None:
        """Everything it names is gone."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _write(self) -> None:
        partial = self.path + ".part"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(partial, flags, 0o600), "w") as f:
                json.dump(self._doc, f)
            os.replace(partial, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise CheckSetupError(
                f"cannot write its record of what it makes, {self.path}: {exc.strerror}"
            ) from None


def _records_dir() -> None:
    """``RECORDS`` made if missing (0700); CheckSetupError if what is there is not a directory
    of this user's that only it can write to (a record there decides what is removed)."""
    try:
        os.mkdir(RECORDS, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CheckSetupError(
            f"cannot make {RECORDS}, for its record of what it makes: {exc.strerror}"
        ) from None
    st = os.lstat(RECORDS)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CheckSetupError(
            f"{RECORDS} is not a directory of this user's that only it writes to: remove it, "
            "zds check keeps its records of what it makes there"
        )


def clear_dead_checks() -> str:
    """Remove what the checks that are gone left, as their records name it: what was removed,
    in one line ("" when nothing). A record that cannot be cleared stays, for a later try; the
    others are cleared all the same, and then the first problem raises ZdsError, naming what
    was removed before it."""
    try:
        entries = sorted(os.listdir(RECORDS))
    except FileNotFoundError:
        return ""
    said: list[str] = []
    problems: list[str] = []
    for entry in entries:
        match = _NAME.fullmatch(entry)
        if match is None:
            continue
        pid, started = int(match[1]), int(match[2])
        if runtime.process_started(pid) == started:
            continue  # (a check that runs)
        path = os.path.join(RECORDS, entry)
        if match[3]:  # (a record half written by a check killed meanwhile)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        try:
            removed = _clear_record(path)
        except (ZdsError, OSError) as exc:
            problems.append(f"{exc} (pid {pid}'s record stays)")
            continue
        if removed:
            said.append(f"removed what a check that did not end left (pid {pid}): {', '.join(removed)}")
    if problems:
        raise CheckSetupError("; ".join([*problems[:1], *said]))
    return "; ".join(said)


def _clear_record(path: str) -> list[str] | None:
    """The things the dead check's record at ``path`` names removed, then the record: what
    was removed; None when another check clears it (it holds its lock) or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if os.fstat(f.fileno()).st_nlink == 0:  # (cleared by another meanwhile)
            return None
        doc = _valid(f.read(RECORD_MAX + 1)) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else None
        removed = [] if doc is None else _remove_recorded(doc)
        os.unlink(path)
    return removed


def _valid(text: bytes) -> dict[str, Any] | None:
    """The record, if it is what ``CheckRecord`` writes (anything else is not trusted)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not (
        isinstance(doc, dict)
        and isinstance(doc.get("token"), str)
        and len(doc["token"]) == 32
        and isinstance(doc.get("tmp"), str | None)
        and isinstance(doc.get("netns"), dict)
        and all(
            isinstance(k, str) and k.startswith(NETNS_PREFIX) and _ints(v, 3) for k, v in doc["netns"].items()
        )
        and isinstance(doc.get("peers"), list)
        and all(_ints(peer, 2) for peer in doc["peers"])
    ):
        return None
    return doc


def _ints(value: object, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(type(x) is int for x in value)


def _remove_recorded(doc: dict[str, Any]) -> list[str]:
    """What ``doc`` names and is still that thing, removed: what to say of it."""
    removed: list[str] = []
    killed = [pid for keeper, started in doc["peers"] for pid in _kill_group(keeper, started, doc["token"])]
    if killed:
        removed.append(f"ztunnel's processes {', '.join(map(str, killed))}")
    names: list[str] = []
    for name, fingerprint in sorted(doc["netns"].items()):
        path = netns_path(name)
        # (a namespace is proven by identity *and* cookie: inode numbers are reused)
        if (fingerprint[2] != -1 and netns_fingerprint(path) == fingerprint) or half_made(path):
            delete_netns(name, missing_ok=True)
            names.append(name)
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        removed.append(f"{len(names)} namespace{'s' if len(names) > 1 else ''} ({shown})")
    if (tmp := doc["tmp"]) is not None and _ours(tmp):
        shutil.rmtree(tmp)
        removed.append(tmp)
    return removed


def _kill_group(keeper: int, started: int, token: str) -> list[int]:
    """SIGKILL to each process of group ``keeper`` (the ztunnel's, its keeper's pid) that
    carries ``token``: none other is the dead check's (a group of that id made since, by a
    process given the pid, has none). Each through a pidfd taken before it is looked at, so a
    pid reused meanwhile is not signalled; then waited for (its ports free again). None at all
    when another process has the keeper's pid (the group's id is held while a member lives:
    given again, none is left)."""
    if runtime.process_started(keeper) not in (None, started):
        return []
    killed: list[tuple[int, int]] = []
    for pid in runtime.process_group(keeper):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        if _in_group_with(pid, keeper, token):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                killed.append((pid, fd))
                continue
        os.close(fd)
    for _, fd in killed:
        with contextlib.suppress(OSError):
            select.select([fd], [], [], KILL_WAIT)
        os.close(fd)
    return [pid for pid, _ in killed]


def _in_group_with(pid: int, pgid: int, token: str) -> bool:
    """Whether process ``pid`` is in group ``pgid`` and carries ``token`` in its environment."""
    fields = runtime.proc_stat(pid)
    if not fields or fields[2:3] != [str(pgid).encode()]:
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:
        return False
    return f"{PEER_ENV}={token}".encode() in environ


def _ours(tmp: str) -> bool:
    """Whether ``tmp`` is a check's temporary directory (as checks make theirs) of this user's."""
    try:
        st = os.lstat(tmp)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and os.path.isabs(tmp)
        and os.path.basename(tmp).startswith(TMP_PREFIX)
    )


def clear_or_warn(role: str, say: Callable[[str], None]) -> None:
    """``clear_dead_checks``, its line said as ``zds check ROLE``'s; a problem said, not fatal
    (what a dead check left is no obstacle to this one: its names and ports are its own)."""
    try:
        line = clear_dead_checks()
    except (ZdsError, OSError) as exc:
        line = f"cannot remove all that a check that did not end left: {exc}"
    if line:
        say(f"zds check {role}: {line}")
