"""Who can open the node agent's unix sockets. Two checks stand between a user and one: the
file's mode and its directory's (the kernel's, at ``connect()``) and the allow-list (the node
agent's, on the peer's credentials: peers.py). The files are 0600 root's; ``--socket-group``
gives them (and a directory the start made for them) to a group, 0660; with ``--allow-uid`` or
``--allow-gid`` they are 0666 (a directory made for them 0755) and the allow-list decides.
Where a file or a directory the start did not make still keeps out a peer the flags let in,
the start says so."""

from __future__ import annotations

import grp
import logging
import os
import pwd
from collections.abc import Iterable

from zds.server.options import ServerOptions
from zds.server.peers import AllowList
from zds.server.startup import sockets

log = logging.getLogger("zds.server")


def give(path: str, opts: ServerOptions, made_dirs: Iterable[str]) -> None:
    """Give the socket file at ``path`` its group (``--socket-group``), and so the directory this
    start made for it (``made_dirs``: 0750), or make that directory 0755 if everyone may try the
    file (``--allow-uid``); the file's mode was set when it was bound."""
    gid, directory = opts.socket_gid, os.path.dirname(os.path.abspath(path))
    if gid is not None:
        os.chown(path, -1, gid)
    if directory in made_dirs:
        if opts.socket_mode & 0o006:
            os.chmod(directory, 0o755)
        elif gid is not None:
            os.chown(directory, -1, gid)


def say_kept_out(opts: ServerOptions, allow: AllowList) -> None:
    """A warning for each socket whose file or directory keeps out a peer ``allow`` lets in."""
    for line in kept_out(opts, allow.uids - {0, os.geteuid()}, allow.gids):
        log.warning(
            "%s: the node agent lets them in, the file keeps them out; open its directory to them "
            "(README: Security model)",
            line,
        )


def kept_out(opts: ServerOptions, extra_uids: Iterable[int], extra_gids: Iterable[int]) -> list[str]:
    """Who a socket's file or directory keeps out though the flags let them in, one line per
    socket (none: nobody): the group of ``--socket-group``, and the ``--allow-uid``/``--allow-gid``
    (``extra_*``) peers. A directory with an ACL is taken to let them in (not read); a file's
    own ACL is not (the mode set at its bind is its ACL's mask)."""
    group = opts.socket_gid
    peers: list[tuple[str, int | None]] = [
        (f"gid {gid}", gid) for gid in sorted({*extra_gids, *_given(group)})
    ]
    peers += [(f"uid {uid}", group if _member(uid, group) else None) for uid in sorted(set(extra_uids))]
    said: list[str] = []
    for _, _, path in sockets(opts):
        directory = os.path.dirname(os.path.abspath(path))
        try:
            file, parent = os.stat(path), os.stat(directory)
        except OSError:
            continue  # (gone meanwhile: the stop says why)
        acl = _has_acl(directory)
        out = [who for who, gid in peers if not _reaches(file, parent, gid, acl)]
        if out:
            said.append(
                f"{', '.join(out)} cannot connect to {path} (mode {file.st_mode & 0o777:04o} group "
                f"{file.st_gid}, in {directory}: mode {parent.st_mode & 0o777:04o} group {parent.st_gid})"
            )
    return said


def _reaches(file: os.stat_result, parent: os.stat_result, gid: int | None, acl: bool) -> bool:
    """Whether a peer not the owner, of group ``gid`` (None: of no group the file is), may open
    ``file`` in ``parent`` (``acl``: the directory has an ACL, taken to let it enter)."""
    if file.st_mode & 0o006 == 0o006:
        return bool(parent.st_mode & 0o001 or acl or (parent.st_gid == gid and parent.st_mode & 0o010))
    return (
        gid is not None
        and file.st_gid == gid
        and file.st_mode & 0o060 == 0o060
        and bool(parent.st_mode & 0o001 or acl or (parent.st_gid == gid and parent.st_mode & 0o010))
    )


def _given(gid: int | None) -> list[int]:
    return [] if gid is None else [gid]


def _member(uid: int, gid: int | None) -> bool:
    """Whether the user ``uid`` is in group ``gid`` (its primary group, or a member) by the
    user and group databases."""
    if gid is None:
        return False
    try:
        user = pwd.getpwuid(uid)
        return user.pw_gid == gid or user.pw_name in grp.getgrgid(gid).gr_mem
    except (KeyError, OverflowError):
        return False


def _has_acl(path: str) -> bool:
    try:
        os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return False
    return True
