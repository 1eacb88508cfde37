"""Network-namespace toolkit: refer to, open, validate, identify, enter and leave.

Light on purpose (no pyroute2, no asyncio until it is used): the fixtures that
make namespaces and pods are imported from their own modules,
``zds.netns.fixtures`` (named namespaces) and ``zds.netns.podnet`` (pods on a
bridge); test applications from ``zds.netns.apps``.
"""

if __name__ != "zds.netns":  # pragma: no cover - only a wrong import gets here
    # netns/ is installed (and symlinked) as zds.netns; importing it as a top-level
    # "netns" would give a second copy of every module, and isinstance would lie.
    raise ImportError(f"import zds.netns, not {__name__}: netns/ is the package zds.netns")


from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .enter import in_netns, netns_cookie, run_in_netns
    from .errors import NetnsError, OutOfFds
    from .handle import NetnsHandle, current_netns, open_netns, open_netns_pid, open_netns_ref
    from .kernel import NetnsIdentity, netns_identity, netns_identity_of_path, validate_netns_fd
    from .ref import NetnsRef, NetnsRefError

#: Each name this package offers -> the module it lives in, loaded when the name is first
#: asked for: a client that only names a pod's netns (``NetnsRef``) never loads ctypes and
#: the rest (~5 ms of ``zds pod add``'s start-up).
_HOME = {
    "in_netns": "enter",
    "netns_cookie": "enter",
    "run_in_netns": "enter",
    "NetnsHandle": "handle",
    "current_netns": "handle",
    "open_netns": "handle",
    "open_netns_pid": "handle",
    "open_netns_ref": "handle",
    "NetnsError": "errors",
    "OutOfFds": "errors",
    "NetnsIdentity": "kernel",
    "netns_identity": "kernel",
    "netns_identity_of_path": "kernel",
    "validate_netns_fd": "kernel",
    "NetnsRef": "ref",
    "NetnsRefError": "ref",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # asked once
    return value


__all__ = [
    "NetnsError",
    "NetnsHandle",
    "NetnsIdentity",
    "NetnsRef",
    "NetnsRefError",
    "OutOfFds",
    "current_netns",
    "in_netns",
    "netns_cookie",
    "netns_identity",
    "netns_identity_of_path",
    "open_netns",
    "open_netns_pid",
    "open_netns_ref",
    "run_in_netns",
    "validate_netns_fd",
]
