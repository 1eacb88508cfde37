"""Which network namespaces the node agent may take as a pod's: never the node's own.

Whoever can talk to the node agent can make it rewrite a namespace's firewall and make
ztunnel listen in it. So a netns is accepted only (1) from an allowed place — a named
netns under an allowed root (default ``/var/run/netns``, ``/run/netns``; ``--netns-root``
adds more), or a process's ``/proc/PID/ns/net`` — and (2) when what was opened is not
the node agent's own netns nor pid 1's (the node's). The second check is on the
identity of the opened file, so symlinks, ``..`` and ``/proc/PID/ns/net`` of a host
process all end at the same refusal.

Which netns is the node's: pid 1's (the node agent shares the node's pid namespace, as in
the compose file). ``/proc/1/ns/net`` needs ptrace access to pid 1, which a node agent
with fewer capabilities than pid 1 and without ``CAP_SYS_PTRACE`` does not have (the
compose file's, with SYS_ADMIN and NET_ADMIN only, had not: the node's netns was then
taken as a pod's). ``/proc/1/net/unix`` needs none, and lists the unix sockets of pid 1's
netns: one the node agent makes is listed there when it runs in the node's netns. When
neither tells, the node agent does not start (``NodeNetnsUnknown``).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from zds import defaults, limits
from zds.errors import ZdsError, printable
from zds.netns import NetnsError, NetnsHandle, NetnsIdentity, NetnsRef, OutOfFds, open_netns
from zds.netns.search import NAMED_DIRS

#: Where named namespaces are, allowed unless ``--netns-root`` adds more.
DEFAULT_ROOTS = NAMED_DIRS

_PROC_PID_NETNS = re.compile(r"/proc/[1-9][0-9]*/ns/net")  # (fullmatch: no last newline either)


def named_dirs(policy: NetnsPolicy | None) -> tuple[str, ...]:
    """The directories of named namespaces to look in for a netns by identity: the allowed
    roots, ``--netns-root`` ones included (the default roots without a policy)."""
    return policy.roots if policy is not None else DEFAULT_ROOTS


class NodeNetnsUnknown(ZdsError):
    """The node's netns cannot be told (so it could not be refused): the node agent must not start."""


class NetnsRefused(NetnsError):
    """A netns the node agent must not take as a pod's (the node's own, or from a place not allowed)."""


@dataclass(frozen=True)
class NetnsPolicy:
    """Allowed roots (resolved) and the identities that are the node's."""

    roots: tuple[str, ...]
    #: identity -> what it is, for the message.
    forbidden: dict[NetnsIdentity, str]

    @functools.cached_property
    def _under(self) -> tuple[tuple[str, str], ...]:
        """Each root with the prefix of what is under it (``/`` is under ``/``, not ``//``)."""
        return tuple((root, root.rstrip("/") + "/") for root in self.roots)

    @classmethod
    def for_this_node(cls, extra_roots: Iterable[str] = ()) -> NetnsPolicy:
        """The policy on this machine: the default roots plus ``extra_roots``; the node's netns
        (pid 1's) and the node agent's own are forbidden. NodeNetnsUnknown if the node's
        cannot be told (module docstring)."""
        own = os.stat("/proc/self/ns/net")
        own_identity = NetnsIdentity(own.st_dev, own.st_ino)
        try:
            node = os.stat("/proc/1/ns/net")
        except OSError as exc:
            if not _shares_netns_with_pid_1():
                raise NodeNetnsUnknown(
                    "cannot tell which netns is the node's, so it could not be refused as a pod's: "
                    f"/proc/1/ns/net: {exc.strerror}, and pid 1 is not in the node agent's own netns; "
                    "give the node agent CAP_SYS_PTRACE (as Istio's node agent has), or run it in "
                    "the node's netns"
                ) from exc
            node_identity = own_identity
        else:
            node_identity = NetnsIdentity(node.st_dev, node.st_ino)
        forbidden = {own_identity: "the node agent's own netns"}
        if node_identity == own_identity:
            forbidden[own_identity] = "the node agent's own netns and pid 1's"
        else:
            forbidden[node_identity] = "pid 1's netns (the node's)"
        roots = tuple(dict.fromkeys(os.path.realpath(r) for r in (*DEFAULT_ROOTS, *extra_roots)))
        for root in extra_roots:
            _only_root_writes(root)
        return cls(roots=roots, forbidden=forbidden)

    def check_place(self, ref: NetnsRef) -> None:
        """Refuse ``ref`` unless, its directories resolved as the kernel does (symlinks, then
        ``..``), it is under an allowed root or a process's ``/proc/PID/ns/net``. A symlink
        as the last part is followed when opening: the identity check then decides."""
        path = ref.location
        self._check_resolved(path, os.path.realpath(_parent(path)))

    def _check_resolved(self, path: str, parent: str) -> None:
        """``check_place`` with ``path``'s directory resolved to ``parent`` (absolute, normal)."""
        if parent.startswith("/proc/") and _PROC_PID_NETNS.fullmatch(f"{parent}/{os.path.basename(path)}"):
            if parent == "/proc/1/ns":  # (refused even when it cannot be opened to be compared)
                raise NetnsRefused(f"netns path {path} is pid 1's: the node is never enrolled as a pod")
            return
        if not any(parent == root or parent.startswith(under) for root, under in self._under):
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
        """Open ``ref`` if it is allowed, then check what was opened.

        The directory is opened first and the place checked on the path the kernel gives
        that open (``/proc/self/fd/N``); the netns is then opened in that very directory,
        so nothing can swap the directory between the check and the open (and it costs a
        few microseconds where resolving it component by component cost ~20)."""
        path = ref.location
        try:
            directory = os.open(_parent(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            # No such directory (an exited process's /proc/PID/ns, ...): checked and opened as
            # given, for the message open_netns has for each case.
            self.check_place(ref)
            handle = open_netns(path)
        else:
            try:
                resolved = os.readlink(f"/proc/self/fd/{directory}")
                if not _is(directory, resolved):  # (/proc/PID/root/...: that process's view)
                    raise NetnsRefused(
                        f"netns path {path} is in another mount namespace (its directory is {printable(resolved)} "
                        "there): not under an allowed root"
                    )
                self._check_resolved(path, resolved)
                if not resolved.startswith("/proc/") and (who := _others_write(os.fstat(directory))):
                    # (the check at start saw a root as it was then, or not yet made)
                    raise NetnsRefused(
                        f"netns path {path}: others can write its directory {printable(resolved)} ({who}), "
                        "and could have put there a link to any netns; not taken as a pod's"
                    )
                handle = open_netns(path, directory=directory)
                if not resolved.startswith("/proc/"):
                    _seen_here(handle, path, resolved)
            finally:
                os.close(directory)
        try:
            self.check_identity(handle.identity, str(ref))
        except NetnsRefused:
            handle.close()
            raise
        return handle


def _seen_here(handle: NetnsHandle, path: str, resolved: str) -> None:
    """Refuse (``handle`` closed) what ``path`` opened unless its directory's entry is that very
    netns in this process's own view: in another mount namespace whose directory is the
    node's (the same inode: ``unshare -m`` without a mount of its own over it), a mount over
    the entry there is not here, and the entry opened through ``/proc/PID/root`` was a netns
    the node's path does not name."""
    here = os.path.join(resolved, os.path.basename(path))
    try:
        st = os.stat(here)
    except OSError:
        st = None
    if st is None or NetnsIdentity(st.st_dev, st.st_ino) != handle.identity:
        handle.close()
        raise NetnsRefused(
            f"netns path {path} is in another mount namespace ({printable(here)} here is "
            f"{'not that netns' if st is not None else 'nothing'}): not under an allowed root"
        )


def _only_root_writes(root: str) -> None:
    """NetnsRootUnsafe if others than root (and group root) can write ``root`` (a ``--netns-root``): they could
    put there a symlink to any netns (another pod's) for the node agent to take as a pod's."""
    try:
        st = os.stat(root)
    except OSError:
        return  # (none yet: nothing is there to take; each open looks again)
    if who := _others_write(st):
        raise NetnsRootUnsafe(
            f"cannot use --netns-root {root}: others can write it ({who}), and could put there a link to any "
            "netns to be taken as a pod's; give a directory only root can write"
        )


def _others_write(st: os.stat_result) -> str:
    """Who besides root (and group root) can write a directory, '' if nobody."""
    if st.st_uid not in (0, os.geteuid()):
        return "owned by another user"
    if st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0):
        return f"mode {st.st_mode & 0o7777:04o}"
    return ""


class NetnsRootUnsafe(ZdsError):
    """A ``--netns-root`` others can write: the node agent does not start."""


def _shares_netns_with_pid_1(listing: str = "/proc/1/net/unix") -> bool:
    """Whether pid 1 is in this process's netns: a unix socket made here is among those
    ``listing`` lists (pid 1's: the sockets of its netns, unbound ones too). Read as bytes:
    the sockets' paths are any bytes any process bound (one not UTF-8 stopped the start)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        inode = str(os.fstat(probe.fileno()).st_ino).encode()
        try:
            with open(listing, "rb") as lines:
                return any(line.split()[6:7] == [inode] for line in lines)
        except OSError:
            return False


def _is(fd: int, path: str) -> bool:
    """Whether ``path``, in this process's view, is the file ``fd`` is open on."""
    try:
        there, here = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def _parent(path: str) -> str:
    """``path``'s directory; NetnsRefused unless ``path`` is absolute and names a file in it."""
    if not os.path.isabs(path):
        raise NetnsRefused(f"netns path {path!r} is not absolute")
    if os.path.basename(path) in ("", ".", "..") or "\0" in path:
        raise NetnsRefused(f"netns path {path!r} does not name a file")
    return os.path.dirname(path)


def hold_for_the_pod(netns: NetnsHandle) -> None:
    """Move a pod's netns fd, held for the pod's life, out of select()'s way (above
    ``NETNS_FD_FLOOR``); OutOfFds (the fd closed) if holding it would leave the node agent
    fewer than ``NODE_AGENT_FD_RESERVE`` free."""
    netns.move_above(defaults.NETNS_FD_FLOOR)
    # Below the floor it found no room above it: count then.
    highest = netns.fileno() if netns.fileno() >= defaults.NETNS_FD_FLOOR else None
    shortage = limits.fd_shortage(defaults.NODE_AGENT_FD_RESERVE, highest=highest)
    if shortage is not None:
        netns.close()
        in_use, limit = shortage
        raise OutOfFds(
            f"fd budget exhausted: the node agent has {in_use} of {limit} fds open "
            f"(RLIMIT_NOFILE), a pod takes 1 and {defaults.NODE_AGENT_FD_RESERVE} are kept "
            "free (rules, connections, sends); raise the limit (ulimit -n, LimitNOFILE) "
            "or enroll fewer pods with this node agent"
        )
