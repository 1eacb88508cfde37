"""Who can open the node agent's unix sockets. Two checks stand between a user and one: the
file's permissions and those of the directories on its path (the kernel's, at
``connect()``), and the allow-list (the node agent's, on the peer's credentials: peers.py).

The files are 0600, root's. ``--socket-group`` gives them to a group, 0660, with the
directories the start made for them (0750). ``--allow-uid`` and ``--allow-gid`` add POSIX
ACL entries for exactly those users and groups: read and write on the files, search on the
directories the start made; nobody else can reach the files, so the allow-list is not the
only wall (the kernel keeps the rest of the node's users from even connecting). Where a
file or a directory still keeps out a peer the flags let in (a directory the start did not
make, a filesystem without ACLs), the start says so, one warning per socket.

The ACL goes in as the kernel's extended attribute ``system.posix_acl_access`` (version 2:
entries of tag, permissions and id, sorted by tag and id): no library for it installs from
PyPI without building against libacl."""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import struct
from collections.abc import Iterable
from typing import NamedTuple

from zds.server.options import ServerOptions
from zds.server.peers import AllowList
from zds.server.startup import sockets

log = logging.getLogger("zds.server")

_ACL_XATTR = "system.posix_acl_access"
_DEFAULT_ACL_XATTR = "system.posix_acl_default"
_ACL_VERSION = 2
_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_R, _W, _X = 4, 2, 1


class Peers(NamedTuple):
    """Who the flags let in besides root and the node agent's own uid."""

    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def of(cls, opts: ServerOptions, allow: AllowList) -> Peers:
        return cls(frozenset(allow.uids - {0, os.geteuid()}), frozenset(allow.gids - _given(opts.socket_gid)))


def give(path: str, opts: ServerOptions, peers: Peers, made_dirs: Iterable[str]) -> None:
    """Open the socket file at ``path`` to its group (``--socket-group``) and its ``peers`` (an
    ACL), and so each directory on its path this start made (``made_dirs``). A directory is
    changed only through an fd opened without following a link, and only if it is this
    process's own: not one put in its place while it was made."""
    gid, path = opts.socket_gid, os.path.abspath(path)
    if gid is not None:
        os.chown(path, -1, gid)
    if peers.uids or peers.gids:
        _grant(path, peers, _R | _W)
    for directory in (d for d in made_dirs if path.startswith(d.rstrip("/") + "/")):
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # (a link, or gone: not what this start made)
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                continue
            if gid is not None:
                os.fchown(fd, -1, gid)
            if peers.uids or peers.gids:
                _grant(fd, peers, _X)
                with contextlib.suppress(OSError):  # (none, or no ACLs here)
                    os.removexattr(fd, _DEFAULT_ACL_XATTR)  # (nothing made in it inherits entries)
        finally:
            os.close(fd)


def _grant(target: str | int, peers: Peers, perm: int) -> None:
    """Give ``target`` (a path, or an fd) an ACL of its owner, group and others as they are in
    effect now, and ``perm`` for ``peers``: nothing else (entries a parent's default ACL put
    there, masked out so far, stay out). Where the filesystem has no ACLs nothing changes
    (the start's warning then says who is kept out)."""
    st = os.stat(target)
    acl = _entries(target, st)
    group_obj = acl.group_obj & (7 if acl.mask is None else acl.mask)
    table = [(_USER_OBJ, (st.st_mode >> 6) & 7, _NO_ID)]
    table += [(_USER, perm, uid) for uid in sorted(peers.uids)]
    table += [(_GROUP_OBJ, group_obj, _NO_ID)]
    table += [(_GROUP, perm, gid) for gid in sorted(peers.gids)]
    table += [(_MASK, group_obj | perm, _NO_ID), (_OTHER, st.st_mode & 7, _NO_ID)]
    data = struct.pack("<I", _ACL_VERSION) + b"".join(_ENTRY.pack(*entry) for entry in table)
    try:
        os.setxattr(target, _ACL_XATTR, data)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise


class _Acl(NamedTuple):
    user_obj: int
    users: dict[int, int]
    group_obj: int
    groups: dict[int, int]
    mask: int | None
    other: int


def _entries(target: str | int, st: os.stat_result) -> _Acl:
    """``target``'s ACL; its mode's bits as one where it has none (or an ACL not understood)."""
    plain = _plain(st)
    try:
        data = os.getxattr(target, _ACL_XATTR)
    except OSError:
        return plain
    if len(data) < 4 or (len(data) - 4) % _ENTRY.size or struct.unpack_from("<I", data)[0] != _ACL_VERSION:
        return plain
    users: dict[int, int] = {}
    groups: dict[int, int] = {}
    group_obj, mask = plain.group_obj, None
    for tag, perm, ident in _ENTRY.iter_unpack(data[4:]):
        if tag == _USER:
            users[ident] = perm & 7
        elif tag == _GROUP:
            groups[ident] = perm & 7
        elif tag == _GROUP_OBJ:
            group_obj = perm & 7
        elif tag == _MASK:
            mask = perm & 7
    return plain._replace(users=users, groups=groups, group_obj=group_obj, mask=mask)


def _plain(st: os.stat_result) -> _Acl:
    """The ACL a file's mode alone is."""
    mode = st.st_mode
    return _Acl((mode >> 6) & 7, {}, (mode >> 3) & 7, {}, None, mode & 7)


def _permits(path: str, uid: int | None, groups: frozenset[int], want: int) -> bool:
    """Whether a peer of ``uid`` (None: any user not the owner) in ``groups`` has ``want`` on
    ``path``, by its mode and ACL as the kernel decides (owner, named user, groups, others;
    an ACL whose mask is empty is not looked at: the group bits of the mode are nothing)."""
    st = os.stat(path)
    acl = _entries(path, st) if st.st_mode & 0o070 else _plain(st)
    mask = 7 if acl.mask is None else acl.mask
    if uid is not None and uid == st.st_uid:
        return acl.user_obj & want == want
    if uid is not None and uid in acl.users:
        return acl.users[uid] & mask & want == want
    matching = [acl.group_obj] if st.st_gid in groups else []
    matching += [perm for gid, perm in acl.groups.items() if gid in groups]
    if matching:
        return any(perm & mask & want == want for perm in matching)
    return acl.other & want == want


def say_kept_out(opts: ServerOptions, peers: Peers) -> None:
    """A warning for each socket whose file or a directory on its path keeps out a peer the
    flags let in."""
    for line in kept_out(opts, peers):
        log.warning("%s: the node agent lets them in, the filesystem does not (README: Security model)", line)


def kept_out(opts: ServerOptions, peers: Peers) -> list[str]:
    """Who the socket files, or the directories on their paths, keep out though the flags let
    them in, one line per socket (none: nobody): the group of ``--socket-group``, and the
    ``--allow-uid``/``--allow-gid`` peers."""
    who: list[tuple[str, int | None, frozenset[int]]] = [
        (f"gid {gid}", None, frozenset({gid})) for gid in sorted({*peers.gids, *_given(opts.socket_gid)})
    ]
    who += [(f"uid {uid}", uid, _groups_of(uid)) for uid in sorted(peers.uids)]
    said: list[str] = []
    for _, _, path in sockets(opts):
        try:
            out = [
                f"{name} ({where})"
                for name, uid, groups in who
                if (where := _blocked(path, uid, groups)) is not None
            ]
        except OSError:
            continue  # (gone meanwhile: the stop says why)
        if out:
            said.append(f"{', '.join(out)} cannot connect to {path}")
    return said


def _blocked(path: str, uid: int | None, groups: frozenset[int]) -> str | None:
    """What keeps such a peer from ``path`` (a directory it may not enter, the file it may not
    write), or None."""
    absolute = os.path.abspath(path)
    ancestors = dict.fromkeys([*_parents(absolute), *_parents(os.path.realpath(absolute))])
    for directory in ancestors:
        if not _permits(directory, uid, groups, _X):
            return f"may not enter {directory}"
    if not _permits(path, uid, groups, _W):  # (a connect() needs write only)
        return "the file is not open to it"
    return None


def _parents(path: str) -> list[str]:
    """The directories ``path`` is in, outermost first."""
    parents: list[str] = []
    while (parent := os.path.dirname(path)) != path:
        parents.append(parent)
        path = parent
    return parents[::-1]


def _given(gid: int | None) -> frozenset[int]:
    return frozenset() if gid is None else frozenset({gid})


def _groups_of(uid: int) -> frozenset[int]:
    """The groups of user ``uid`` by the user and group databases (none known: none)."""
    try:
        user = pwd.getpwuid(uid)
    except (KeyError, OverflowError):
        return frozenset()
    return frozenset({user.pw_gid, *(g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem)})
