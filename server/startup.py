"""``zds server``'s first two start-up steps, before anything is served: what the flags name
is checked, then every path is claimed. Each refuses in one line, leaving nothing behind
(no lock file, no state directory, no pod store of its own making)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zds import defaults
from zds.errors import not_utf8
from zds.server.instance import (
    InstanceError,
    InstanceLock,
    PrivateDir,
    missing_dirs,
    remove_dirs,
    socket_lock,
    state_lock,
)
from zds.server.options import ServerOptions, StartupError, host_port, split_host_port
from zds.server.pods import PodSpec, PodSpecError
from zds.server.podsfile import load_pods_file
from zds.server.storefile import DB_NAME
from zds.transport import SocketPathTaken, clear_socket_path, refuse_non_socket

if TYPE_CHECKING:
    from zds.server.faults import FaultSpec

log = logging.getLogger("zds.server")

#: The URLs ``--container-engine`` may be (the Docker client library's, but Windows' named
#: pipes; and SSH, which needs a library zds does not install, where that is there).
ENGINE_SCHEMES = ("unix", "tcp", "http", "https")


def _have(*modules: str) -> bool:
    """Whether every one of ``modules`` can be imported (``aiodocker.ssh``: aiodocker from 0.25)."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(module) is not None for module in modules)
    except ImportError:  # (a parent package missing)
        return False


def read_flags(opts: ServerOptions) -> tuple[list[PodSpec], list[FaultSpec]]:
    """Check what the flags name (socket paths, listen addresses, the pods and faults
    files) before anything is claimed or written: a bad one stopped the start after the pod
    store and the lock files were made. The files' pods and faults."""
    from zds.server.faultkinds import FaultError
    from zds.server.faultsfile import load_faults_file

    for flag, what, path in sockets(opts):
        _bindable(flag, what, path)
    grpc_path = PrivateDir.socket_path(opts.control_socket)
    if grpc_path is not None and (bad := not_utf8([opts.control_socket])) is not None:
        # (it was refused only once the pod store was made, in gRPC's codec's words; a longer
        # one is served through /proc/self/fd/N/grpc.sock, whatever bytes the path holds)
        raise StartupError(
            f"--control-socket {bad}: not UTF-8 text, and gRPC serves only a UTF-8 path "
            f"(its socket {PrivateDir.SUFFIX}/{PrivateDir.SOCKET} beside it); give a UTF-8 path"
        )
    if opts.container_label and not opts.container_engine:
        raise StartupError("--container-label only applies with --container-engine")
    if opts.container_engine and "://" in opts.container_engine:
        scheme, _, rest = opts.container_engine.partition("://")
        if scheme not in ENGINE_SCHEMES and not (scheme == "ssh" and _have("asyncssh", "aiodocker.ssh")):
            # (it was retried for good: "Missing protocol scheme")
            raise StartupError(
                f"--container-engine {opts.container_engine}: give the API socket's path, or a "
                "unix://, tcp://, http:// or https:// URL (ssh:// with asyncssh installed)"
            )
        if not _engine_address_ok(scheme, rest):  # (each was retried for good, in a line that did not say)
            raise StartupError(
                f"--container-engine {opts.container_engine}: "
                + ("no socket path after unix://" if scheme == "unix" else "not a URL with a host (and port)")
            )
    if relative := [root for root in opts.netns_roots if not os.path.isabs(root)]:
        raise StartupError(f"--netns-root {relative[0]}: give an absolute path")
    _check_dirs(opts)
    if opts.http_listen:
        split_host_port(opts.http_listen, "--http-listen")
    try:
        pods = load_pods_file(opts.pods_file) if opts.pods_file else []
    except PodSpecError as exc:
        raise StartupError(str(exc)) from exc
    try:
        faults = load_faults_file(opts.faults_file) if opts.faults_file else []
    except FaultError as exc:
        raise StartupError(f"--faults {opts.faults_file}: {exc}") from exc
    return pods, faults


def _check_dirs(opts: ServerOptions) -> None:
    """The state directory and each ``--netns-root``: a directory, or nothing yet. The state
    directory is made at the start (a file there was "File exists"); a netns root is made by
    whatever makes the namespaces in it, maybe after this start (Docker makes
    /var/run/docker/netns with its first container, as /var/run/netns is made with the first
    named netns): a missing one is said, not refused (a typo is taken silently otherwise)."""
    if not opts.state_dir:
        raise StartupError("--state-dir: give a directory (an empty path names none)")
    if os.path.exists(opts.state_dir) and not os.path.isdir(opts.state_dir):
        raise StartupError(f"cannot use state directory: {opts.state_dir} is not a directory")
    for root in opts.netns_roots:
        if not os.path.exists(root):
            log.warning(
                "--netns-root %s does not exist (yet): pods' namespaces there are taken once it is "
                "made; check the path if nothing is to make it",
                root,
            )
        elif not os.path.isdir(root):
            raise StartupError(
                f"--netns-root {root} is not a directory; give the directory that holds pods' named namespaces"
            )


def _engine_address_ok(scheme: str, rest: str) -> bool:
    """Whether what follows ``scheme://`` in ``--container-engine`` names something."""
    if scheme == "unix":
        return bool(rest)
    try:
        parsed = urllib.parse.urlsplit(f"{scheme}://{rest}")
        _ = parsed.port  # (ValueError: not a port)
    except ValueError:
        return False
    return bool(parsed.hostname)


def check_ports(opts: ServerOptions) -> None:
    """Refuse a TCP address something holds now: once the paths are claimed (a second node
    agent is named as one first), before the pod store is opened (it was found when bound,
    the pods recovered with their rules and the ZDS socket served)."""
    if opts.http_listen:
        # (aiohttp binds an IPv6 address v6-only; gRPC binds it for both families)
        _free_port("--http-listen", *split_host_port(opts.http_listen, "--http-listen"), v6only=True)
    if opts.grpc_listen:
        _free_port("--grpc-listen", *split_host_port(opts.grpc_listen, "--grpc-listen"), v6only=False)


def _free_port(flag: str, host: str, port: int, *, v6only: bool) -> None:
    """Refuse ``host:port`` when it cannot be bound; a host name: each address it resolves to
    (its server binds them all), an address this host has no use for (no IPv6) left to it."""
    if port == 0:
        return
    try:
        version = ipaddress.ip_address(host).version
        addresses: list[tuple[socket.AddressFamily, tuple[Any, ...]]] = [
            (socket.AF_INET6 if version == 6 else socket.AF_INET, (host, port))
        ]
        named = False
    except ValueError:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return  # (a name that does not resolve: its server says so when it binds)
        addresses = list(dict.fromkeys((info[0], info[4]) for info in found))
        named = True
    for family, sockaddr in addresses:
        try:
            with socket.socket(family) as probe:  # (no IPv6 on this host: EAFNOSUPPORT here)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as the servers bind)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
                probe.bind(sockaddr)
        except OSError as exc:
            if named and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # (its server binds the name's other addresses)
            which = f" ({sockaddr[0]})" if named else ""
            raise StartupError(f"{flag} {host_port(host, port)}{which}: {exc.strerror}") from None


def sockets(opts: ServerOptions) -> list[tuple[str, str, str]]:
    """The unix sockets the node agent serves: each one's flag, what it serves (for a
    refusal) and path."""
    sockets = [
        ("--zds-socket", "ZDS socket", opts.zds_socket),
        ("--control-socket", "control socket", opts.control_socket),
    ]
    if opts.cni_socket:
        sockets.append(("--cni-socket", "CNI plugin socket", opts.cni_socket))
    return sockets


@dataclass(frozen=True)
class Claim:
    """What ``claim_paths`` found."""

    #: The state directory held a node agent before (its lock file was there).
    used_before: bool
    #: The directories this start made for the state directory (it and missing parents, outermost first).
    made_dirs: list[str]


def _others_write(st: os.stat_result) -> str:
    """Who besides this user can write what ``st`` describes ('' if none)."""
    if st.st_uid != os.geteuid():
        return "owned by another user"
    return f"mode {st.st_mode & 0o7777:04o}" if st.st_mode & 0o022 else ""


def claim_paths(opts: ServerOptions, lock: InstanceLock) -> Claim:
    """Lock every socket path and the state directory, or stop before touching anything."""
    seen: dict[str, str] = {}
    for flag, _, path in sockets(opts):
        where = os.path.normpath(os.path.abspath(path))
        if (other := seen.setdefault(where, flag)) != flag:
            raise StartupError(f"{other} and {flag} are the same path {path}: give each socket its own")
    used_before = os.path.exists(state_lock(opts.state_dir))
    made = missing_dirs(opts.state_dir)
    try:
        os.makedirs(opts.state_dir, mode=0o700, exist_ok=True)
        st = os.stat(opts.state_dir)
    except OSError as exc:
        raise StartupError(f"cannot use state directory {opts.state_dir}: {exc.strerror}") from exc
    # The pod store says which namespaces get rules and go to ztunnel: whoever else can
    # write the directory could put a store of their own in it.
    if who := _others_write(st):
        raise StartupError(
            f"cannot use state directory {opts.state_dir}: others can write it ({who}); "
            "give zds a directory only its own user can write (chmod go-w, or another --state-dir)"
        )
    stored = () if opts.reset_state else (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm")  # (else moved aside)
    for name in stored:
        path = os.path.join(opts.state_dir, name)
        with contextlib.suppress(FileNotFoundError):
            if who := _others_write(os.stat(path)):
                raise StartupError(
                    f"cannot use the pod store's {path}: others can write it ({who}), and it says which "
                    "namespaces get rules; chown or chmod go-w it if it is this node agent's, else move it away"
                )
    try:
        lock.acquire(
            [(path, socket_lock(path)) for _, _, path in sockets(opts)]
            + [(opts.state_dir, state_lock(opts.state_dir))]
        )
    except InstanceError as exc:
        remove_dirs(made)  # (another agent serves a socket: what this start made goes)
        raise StartupError(str(exc)) from exc
    try:
        now = os.stat(opts.state_dir)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        # Removed (by a refused start that had made it) and made again by the lock file's
        # creation, unchecked: not the directory checked above.
        lock.remove_made()
        lock.release()
        raise StartupError(
            f"cannot use state directory {opts.state_dir}: it was replaced while this node agent "
            "started (another start that was refused removed it); start again"
        )
    return Claim(used_before, made)


def clear_sockets(opts: ServerOptions) -> None:
    """Each socket path claimed: a stale socket there goes, another program's live one is
    refused now, before the pod store is opened (and a start refused made it)."""
    for _, what, path in sockets(opts):
        try:
            clear_socket_path(path)
        except SocketPathTaken as exc:
            raise StartupError(f"cannot listen on {what}: {exc}") from exc
        except OSError as exc:
            raise StartupError(f"cannot listen on {what} {path}: {exc}") from exc


def _bindable(flag: str, what: str, path: str) -> None:
    """A unix socket can be bound at ``path`` (checked before anything is made for it): the
    path is short enough, and holds nothing but maybe a socket (a live one is told apart
    once the path is claimed)."""
    if not path:
        raise StartupError(f"{flag}: give a path (an empty one names no socket)")
    size = len(os.fsencode(path))
    if size > defaults.SUN_PATH_MAX:
        raise StartupError(
            f"{flag} {path}: {size} bytes, longer than a unix socket path may be ({defaults.SUN_PATH_MAX}); "
            "give a shorter one"
        )
    try:
        refuse_non_socket(path)
    except SocketPathTaken as exc:
        raise StartupError(f"cannot listen on {what}: {exc}") from exc
