"""The process's resource limits: its fds (the soft RLIMIT_NOFILE raised, the kernel's fd
table grown ahead, what is left before the limit) and glibc's malloc arenas."""

from __future__ import annotations

import contextlib
import os

#: mallopt's parameter for the most malloc arenas (glibc's malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> bool:
    """Let glibc's malloc keep at most ``arenas`` arenas (unless ``MALLOC_ARENA_MAX`` or
    ``GLIBC_TUNABLES``' ``glibc.malloc.arena_max`` says otherwise): it gives each thread that
    allocates an arena of its own (while none freed by an exited thread is there), up to 8 a CPU,
    and what is freed in one stays resident there. Call before those threads allocate.
    False where that cannot be asked (not glibc)."""
    import ctypes

    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, as ztunnel does at start-up
    (Go programs such as Istio's node agent get the same from Go's runtime). Returns
    (soft, hard) as they are now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass  # keep what we have
    return soft, hard


def fd_shortage(reserve: int, highest: int | None = None) -> tuple[int, int] | None:
    """(fds open, soft RLIMIT_NOFILE) when fewer than ``reserve`` fds are free, else None.
    ``highest``, the number of an fd just made, spares the count (a listing of every fd)
    while it is far from the limit: fds are numbered from the lowest free one up."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY or (highest is not None and highest < limit - reserve):
        return None
    try:
        in_use = len(os.listdir("/proc/self/fd")) - 1  # less the one the listing had open
    except OSError:  # (EMFILE: not even that one)
        in_use = limit
    return (in_use, limit) if limit - in_use < reserve else None


def grow_fd_table(entries: int) -> None:
    """Make the kernel's fd table of this process hold ``entries`` fds now (at most the soft
    RLIMIT_NOFILE), so that opening that many needs no growth later. The kernel grows the
    table of a process with threads (the node agent's gRPC and libuv ones) only after an RCU
    grace period: measured here, 7 to 14 ms each time it doubles, on whatever enrollment opened
    the fd that needed it. Costs 8 bytes and two bits an entry of kernel memory; where it
    cannot be done, the table grows as it would have."""
    import fcntl
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    highest = min(entries, soft) - 1 if soft != resource.RLIM_INFINITY else entries - 1
    with contextlib.suppress(OSError):
        anchor = os.open("/", os.O_PATH | os.O_CLOEXEC)
        try:
            # The lowest free fd at or above ``highest`` (never one in use), closed at once.
            os.close(fcntl.fcntl(anchor, fcntl.F_DUPFD_CLOEXEC, highest))
        finally:
            os.close(anchor)
