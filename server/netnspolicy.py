"""Which network namespaces the node agent may take as a pod's: never the node's own.

Whoever can talk to the node agent can make it rewrite a namespace's firewall and make
ztunnel listen in it. So a netns is accepted only (1) from an allowed place — a named
netns under an allowed root (default ``/var/run/netns``, ``/run/netns``; ``--netns-root``
adds more), or a process's ``/proc/PID/ns/net`` — and (2) when what was opened is not
the node agent's own netns nor pid 1's (the node's). The second check is on the
identity of the opened file, so symlinks, ``..`` and ``/proc/PID/ns/net`` of a host
process all end at the same refusal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from zds import defaults
from zds.netns import NetnsError, NetnsHandle, NetnsIdentity, NetnsRef, open_netns

#: Where named namespaces are, unless ``--netns-root`` adds more.
DEFAULT_ROOTS = (defaults.NETNS_RUN_DIR, "/run/netns")

_PROC_PID_NETNS = re.compile(r"^/proc/[1-9][0-9]*/ns/net$")


class NetnsRefused(NetnsError):
    """A netns the node agent must not take as a pod's (the node's own, or from a place not allowed)."""


@dataclass(frozen=True)
class NetnsPolicy:
    """Allowed roots (resolved) and the identities that are the node's."""

    roots: tuple[str, ...]
    #: identity -> what it is, for the message.
    forbidden: dict[NetnsIdentity, str]

    @classmethod
    def for_this_node(cls, extra_roots: Iterable[str] = ()) -> NetnsPolicy:
        """The policy on this machine: the default roots plus ``extra_roots``; the node agent's
        own netns and pid 1's are forbidden."""
        forbidden: dict[NetnsIdentity, str] = {}
        for path, what in (
            ("/proc/1/ns/net", "pid 1's netns (the node's)"),
            ("/proc/self/ns/net", "the node agent's own netns"),
        ):
            try:
                st = os.stat(path)
            except OSError:
                continue
            forbidden.setdefault(NetnsIdentity(st.st_dev, st.st_ino), what)
        roots = tuple(dict.fromkeys(os.path.realpath(r) for r in (*DEFAULT_ROOTS, *extra_roots)))
        return cls(roots=roots, forbidden=forbidden)

    def check_place(self, ref: NetnsRef) -> None:
        """Refuse ``ref`` unless, its directories resolved as the kernel does (symlinks, then
        ``..``), it is under an allowed root or a process's ``/proc/PID/ns/net``. A symlink
        as the last part is followed when opening: the identity check then decides."""
        path = ref.location
        if not os.path.isabs(path):
            raise NetnsRefused(f"netns path {path!r} is not absolute")
        parent, name = os.path.realpath(os.path.dirname(path)), os.path.basename(path)
        resolved = os.path.join(parent, name)
        if name in ("", ".", "..") or "\0" in path:
            raise NetnsRefused(f"netns path {path!r} does not name a file")
        if _PROC_PID_NETNS.match(resolved):
            return
        if not any(os.path.commonpath([parent, root]) == root for root in self.roots):
            raise NetnsRefused(
                f"netns path {path} is not under an allowed root ({', '.join(self.roots)}) nor a "
                "/proc/PID/ns/net; add its directory with --netns-root if it holds pods' namespaces"
            )

    def allows_place(self, ref: NetnsRef) -> bool:
        """Whether ``check_place`` lets ``ref`` through."""
        try:
            self.check_place(ref)
        except NetnsRefused:
            return False
        return True

    def check_identity(self, identity: NetnsIdentity, what: str) -> None:
        """Refuse the node's own netns, whatever path led to it."""
        node = self.forbidden.get(identity)
        if node is not None:
            raise NetnsRefused(f"netns {what} is {node} ({identity}): the node is never enrolled as a pod")

    def open(self, ref: NetnsRef) -> NetnsHandle:
        """Open ``ref`` if it is allowed, then check what was opened."""
        self.check_place(ref)
        # The path as given (messages name it so); the kernel resolves it as check_place did.
        handle = open_netns(ref.location)
        try:
            self.check_identity(handle.identity, str(ref))
        except NetnsRefused:
            handle.close()
            raise
        return handle
