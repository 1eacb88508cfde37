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


from .enter import in_netns, netns_cookie, run_in_netns
from .handle import NetnsHandle, current_netns, open_netns, open_netns_pid, open_netns_ref
from .kernel import NetnsError, NetnsIdentity, netns_identity, validate_netns_fd
from .ref import NetnsRef, NetnsRefError

__all__ = [
    "NetnsError",
    "NetnsHandle",
    "NetnsIdentity",
    "NetnsRef",
    "NetnsRefError",
    "current_netns",
    "in_netns",
    "netns_cookie",
    "netns_identity",
    "open_netns",
    "open_netns_pid",
    "open_netns_ref",
    "run_in_netns",
    "validate_netns_fd",
]
