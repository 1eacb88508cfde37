"""Named network namespaces to test and demo with (``/var/run/netns/NAME``), as ``ip netns`` makes them.

Pods on a bridge (veth, addresses, routes) are in ``podnet``.

Everything here goes through pyroute2 (netlink and its netns helpers), never
the ``ip`` command. What a fixture creates it also removes, on error too:
a half-made namespace or pod is undone before the error reaches the caller.

pyroute2's synchronous ``IPRoute`` drives its own asyncio loop and so cannot
run in a thread where a loop is already running; these functions are
synchronous and move their netlink work to a short-lived worker thread when
called from such a thread (from a coroutine, say). Open it with ``iproute()``,
never ``IPRoute()``: an interrupt must not land inside it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns
from pyroute2.process import ChildProcess

from zds import defaults, runtime

from .enter import in_netns, netns_cookie
from .errors import NetnsError
from .handle import NETNS_NAME, open_netns
from .kernel import CLONE_NEWNET, THREAD_NETNS, _libc

log = logging.getLogger(__name__)

T = TypeVar("T")


def off_event_loop(fn: Callable[[], T]) -> T:
    """Run ``fn`` here, or in a worker thread when an asyncio loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="zds-netns") as pool:
        return pool.submit(fn).result()


@contextmanager
def iproute() -> Iterator[Any]:
    """An ``IPRoute`` (a netlink socket with an asyncio loop of its own) made, used and closed
    with the stop signals held (``runtime.interrupts_held``): an interrupt raised inside
    pyroute2 left a loop half-made or unclosed, whose coroutine or transport then printed
    "Exception ignored ... Event loop is closed" tracebacks (4 of 114 interrupted ``zds netns
    create --bridge``), or (once, here) left pyroute2 spinning in its loop for good. The
    price: should pyroute2 hang inside, a Ctrl-C waits for it (SIGKILL does not)."""
    with runtime.interrupts_held(), IPRoute() as ipr:
        yield ipr


def check_name(name: str) -> None:
    if not NETNS_NAME.fullmatch(name):  # (match: $ also matched before a last newline)
        raise NetnsError(
            f'bad netns name "{name}": use letters, digits, ".", "_" and "-", starting with a letter or digit'
        )


def netns_path(name: str) -> str:
    """Where the named namespace ``name`` lives (``/var/run/netns/NAME``)."""
    return os.path.join(defaults.NETNS_RUN_DIR, name)


# --- named namespaces ---------------------------------------------------------------


def _exists_message(name: str, path: str) -> str:
    return (
        f'netns {name} exists already ({path}); delete it with "zds netns delete {name}" or pick another name'
    )


def _remove_entry(path: str) -> None:
    """Unmount and unlink ``path`` (pyroute2's netns.remove); a missing path is fine."""
    with suppress(FileNotFoundError):
        pyroute2_netns.remove(path)


def _set_link_up(ifname: str) -> None:
    with iproute() as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        ipr.link("set", index=index, state="up")


def _made_in_a_thread(path: str, told: Callable[[str], None]) -> None:
    """A new netns bind-mounted on ``path`` by a thread of its own (unshare changes that
    thread's netns only, and the thread ends with it), ``told`` first of the namespace by a
    path that names it before ``path`` does (the thread's own, ``THREAD_NETNS``), and
    loopback up. What went wrong is raised here."""
    failed: list[BaseException] = []

    def make() -> None:
        try:
            if _libc().unshare(CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
            told(THREAD_NETNS)
            pyroute2_netns._create(path, None, pid="thread-self")  # (no unshare: given the pid)
            _set_link_up("lo")
        except BaseException as e:  # (raised in the caller's thread)
            failed.append(e)

    thread = threading.Thread(target=make, name="zds-netns-create", daemon=True)
    thread.start()
    interrupted: BaseException | None = None
    while thread.is_alive():
        try:
            thread.join()
        except BaseException as e:  # (Ctrl-C: what the thread began ends first, then is undone)
            interrupted = e
    if interrupted is not None:
        raise interrupted
    if failed:
        raise failed[0]


def _create_named(name: str, path: str, told: Callable[[str], None] | None = None) -> None:
    try:
        if told is not None:
            _made_in_a_thread(path, told)
            return
        # What pyroute2.netns.create does (a forked child unshares and bind-mounts
        # its netns on path), but with the child always reaped: netns.create
        # leaves a zombie behind when the child reports an error.
        with ChildProcess(target=pyroute2_netns._create, args=[path, None]) as child:
            child.communicate()
    except FileExistsError:
        raise NetnsError(_exists_message(name, path)) from None
    except BaseException as e:
        # Ours (create_netns saw nothing there): also when interrupted (Ctrl-C, SIGTERM)
        # while the child made it, which left a netns entry for good.
        _remove_entry(path)
        if not isinstance(e, Exception):
            raise
        hint = "; run as root (needs CAP_SYS_ADMIN)" if getattr(e, "errno", None) == errno.EPERM else ""
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise NetnsError(f"cannot create netns {name}: {reason}{hint}") from None
    try:
        with open_netns(path) as handle, in_netns(handle):
            _set_link_up("lo")
    except BaseException as e:
        _remove_entry(path)
        if isinstance(e, NetlinkError):
            raise NetnsError(f"cannot bring loopback up in new netns {name}: {e}") from None
        raise


def create_netns(name: str, *, told: Callable[[str], None] | None = None) -> str:
    """Create the named network namespace ``/var/run/netns/NAME`` with loopback up; return its path.

    ``told(where)``: called with a path that names the new namespace before it has its name
    (a record of what is whose then names it before anyone can find it by name)."""
    check_name(name)
    path = netns_path(name)
    if os.path.lexists(path):
        raise NetnsError(_exists_message(name, path))
    off_event_loop(lambda: _create_named(name, path, told))
    log.debug("created netns", extra={"netns": path})
    return path


def delete_netns(name: str, *, missing_ok: bool = False) -> None:
    """Delete the named network namespace (unmount and unlink ``/var/run/netns/NAME``).

    The namespace itself lives on while some fd or process still holds it.
    A missing one is an error unless ``missing_ok``.
    """
    check_name(name)
    path = netns_path(name)
    if not os.path.lexists(path):
        if missing_ok:
            return
        raise NetnsError(f'cannot delete netns {name}: {path} does not exist; see "zds netns list"')
    try:
        pyroute2_netns.remove(path)
    except FileNotFoundError:
        if not missing_ok:
            raise NetnsError(f"cannot delete netns {name}: {path} vanished meanwhile") from None
    except OSError as e:
        hint = "; run as root (needs CAP_SYS_ADMIN)" if e.errno in (errno.EPERM, errno.EACCES) else ""
        raise NetnsError(f"cannot delete netns {name}: {e.strerror}{hint}") from None
    log.debug("deleted netns", extra={"netns": path})


def netns_fingerprint(path: str) -> list[int] | None:
    """[dev, ino, cookie] of the namespace at ``path`` (cookie -1 where the kernel has none):
    what proves a namespace is the one recorded (inode numbers are reused, cookies are not).
    None if no namespace is there."""
    try:
        handle = open_netns(path)
    except NetnsError:
        return None
    try:
        cookie = netns_cookie(handle)
    finally:
        handle.close()
    return [handle.identity.dev, handle.identity.ino, -1 if cookie is None else cookie]


def half_made(path: str) -> bool:
    """``path`` is what a netns name is before the namespace is mounted on it: an empty
    regular file of its own, no mount point (its maker killed between the two)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and not os.path.ismount(path)


def list_netns() -> list[str]:
    """The names in ``/var/run/netns``, sorted (as ``ip netns list`` shows them)."""
    return sorted(pyroute2_netns.listnetns(defaults.NETNS_RUN_DIR))
