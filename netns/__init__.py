"""Network-namespace toolkit: open, validate, identify, enter and leave; fixtures."""

from .apps import EchoServer, exchange
from .fixtures import PodFixture, PodNetwork, create_netns, delete_netns, list_netns, netns_path
from .handle import (
    NetnsError,
    NetnsHandle,
    NetnsIdentity,
    current_netns,
    in_netns,
    netns_identity,
    open_netns,
    open_netns_pid,
    open_netns_ref,
    run_in_netns,
    validate_netns_fd,
)

__all__ = [
    "EchoServer",
    "NetnsError",
    "NetnsHandle",
    "NetnsIdentity",
    "PodFixture",
    "PodNetwork",
    "create_netns",
    "current_netns",
    "delete_netns",
    "exchange",
    "in_netns",
    "list_netns",
    "netns_identity",
    "netns_path",
    "open_netns",
    "open_netns_pid",
    "open_netns_ref",
    "run_in_netns",
    "validate_netns_fd",
]
