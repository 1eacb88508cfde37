"""Find network namespaces by identity when the path a pod was enrolled with is gone.

Istio's node agent finds a pod's netns by scanning ``/proc`` (``podcgroupns.go``,
by the pod uid in each process's cgroup path). zds knows more: the identity
(``st_dev``, ``st_ino``) the netns had at enrollment, and a netns is alive
exactly as long as something holds it — a process in it, or a bind mount. So
it looks at every ``/proc/PID/ns/net`` and every named namespace
(``/var/run/netns``, ``/run/netns``, and any other directory the caller names: the node
agent's ``--netns-root`` directories) for those identities, in one pass.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from zds import defaults

from .errors import OutOfFds
from .kernel import NetnsIdentity

#: Where named namespaces are bind-mounted (``ip netns``, CNI runtimes).
NAMED_DIRS = (defaults.NETNS_RUN_DIR, "/run/netns")


def find_by_identity(
    wanted: Iterable[NetnsIdentity], named_dirs: Iterable[str] = NAMED_DIRS
) -> dict[NetnsIdentity, str]:
    """A path that holds each of ``wanted`` now (a named netns in one of ``named_dirs`` first,
    each directory's own entries only, else the oldest process's ``/proc/PID/ns/net``);
    identities not found are absent from the answer. OutOfFds if a directory could not be
    listed for want of an fd."""
    remaining = set(wanted)
    found: dict[NetnsIdentity, str] = {}
    if not remaining:
        return found
    for directory in dict.fromkeys(named_dirs):
        for path in _entries(directory):
            _match(path, remaining, found)
    pids = sorted(int(name) for name in _names("/proc") if name.isdigit())
    for pid in pids:  # lowest pid first: the oldest process, the one least likely to be gone soon
        if not remaining:
            break
        if pid != os.getpid():
            _match(f"/proc/{pid}/ns/net", remaining, found)
    return found


def _match(path: str, remaining: set[NetnsIdentity], found: dict[NetnsIdentity, str]) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return  # gone meanwhile, or not ours to look at
    identity = NetnsIdentity(st.st_dev, st.st_ino)
    if identity in remaining:
        remaining.discard(identity)
        found[identity] = path


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # (not "nothing there": it could not look)
            raise OutOfFds(f"cannot list {directory}: {exc.strerror}") from None
        return []


def _entries(directory: str) -> list[str]:
    return [os.path.join(directory, name) for name in sorted(_names(directory))]
