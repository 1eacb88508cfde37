"""Event loop selection and privilege checks shared by every command."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Bits of /proc/self/status CapEff (linux/capability.h).
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21}


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` on uvloop when it is installed and wanted, else on asyncio's loop."""
    import asyncio  # here, not at the top: building the CLI parser must stay cheap

    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)


def missing_capabilities(needed: tuple[str, ...] = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN")) -> list[str]:
    """The capabilities in ``needed`` this process does not have."""
    effective = 0
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    effective = int(line.split()[1], 16)
    except OSError:
        return list(needed)
    return [name for name in needed if not effective & (1 << CAPABILITIES[name])]


def privilege_error(command: str, needed: tuple[str, ...] = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN")) -> str | None:
    """A one-line error naming the missing capabilities, or None when all are there."""
    missing = missing_capabilities(needed)
    if not missing:
        return None
    return f"zds {command}: needs root or {' + '.join(needed)}; missing {', '.join(missing)}"


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
