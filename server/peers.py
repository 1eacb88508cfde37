"""Who may talk to the node agent over its unix sockets: ``SO_PEERCRED`` against an allow-list.

The ZDS socket (ztunnel), the control socket (``zds pod``, grpcurl) and the CNI plugin
socket each check the kernel's word on who connected: the peer's uid, gid, supplementary
groups (``SO_PEERGROUPS``) and pid, which it cannot fake. Allowed by default: root and the
node agent's own uid; ``--allow-uid`` and ``--allow-gid`` add more (and ``--socket-group``
allows that group, a peer's primary or supplementary one). A refused peer is logged once per
process — pid, uid, gid and executable — and closed.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from zds.errors import printable
from zds.transport import PeerCredentials

log = logging.getLogger("zds.server.peers")

#: Refused processes remembered so each is logged once (a client retrying in a loop is one line).
REMEMBERED = 1024


def executable(pid: int) -> str:
    """The program of process ``pid``, as a log line may show it (its name is anyone's choice:
    a newline or an escape in it is written as its escape)."""
    try:
        return printable(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return "?"


@dataclass(frozen=True)
class AllowList:
    """The uids and gids that may connect."""

    uids: frozenset[int]
    gids: frozenset[int] = frozenset()

    @classmethod
    def default(cls, uids: Iterable[int] = (), gids: Iterable[int] = ()) -> AllowList:
        """Root and this process's own uid, plus ``uids`` and ``gids``."""
        return cls(uids=frozenset({0, os.geteuid(), *uids}), gids=frozenset(gids))

    def allows(self, peer: PeerCredentials | None) -> bool:
        """A gid allowed lets in a peer of that primary group or with it among its
        supplementary ones (``usermod -aG``, a pod's ``supplementalGroups``: the socket
        file's group lets those connect too)."""
        return peer is not None and (
            peer.uid in self.uids or peer.gid in self.gids or not self.gids.isdisjoint(peer.groups)
        )

    def describe(self) -> str:
        parts = [f"uid {', '.join(map(str, sorted(self.uids)))}"]
        if self.gids:
            parts.append(f"gid {', '.join(map(str, sorted(self.gids)))}")
        return " or ".join(parts)


class PeerGuard:
    """An allow-list and the refusals already logged, for one socket."""

    def __init__(self, allow: AllowList, socket_name: str) -> None:
        self.allow = allow
        self.socket_name = socket_name
        self._logged: OrderedDict[int, None] = OrderedDict()

    def check(self, peer: PeerCredentials | None) -> bool:
        """True if ``peer`` may talk; else log it (once per process)."""
        if self.allow.allows(peer):
            return True
        key = peer.pid if peer is not None else -1
        if key not in self._logged:
            self._logged[key] = None
            if len(self._logged) > REMEMBERED:
                self._logged.popitem(last=False)
            who = (
                f"pid {peer.pid} uid {peer.uid} gid {peer.gid} ({executable(peer.pid)})"
                if peer is not None
                else "a peer whose credentials the kernel could not give"
            )
            log.warning(
                "refused a connection on the %s socket from %s: permission denied (allowed: %s; "
                "see --allow-uid, --allow-gid, --socket-group)",
                self.socket_name,
                who,
                self.allow.describe(),
            )
        return False
