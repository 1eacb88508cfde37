"""``zds netns create|delete|list``: named network namespaces for tests, demos and compose."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import Any

from zds import cliflags, defaults, runtime


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``zds netns`` and its subcommands to the top-level parser."""
    parser = sub.add_parser(
        "netns",
        help="create, delete and list named network namespaces",
        description=f"Named network namespaces in {defaults.NETNS_RUN_DIR} (fixtures for tests and demos).",
    )
    commands = parser.add_subparsers(dest="netns_command", metavar="SUBCOMMAND", required=True)

    create = commands.add_parser(
        "create",
        help="create named network namespaces (loopback up); with --bridge, pods that reach each other",
        description="Create named network namespaces with loopback up. With --bridge, each is a pod: "
        "a veth into that bridge in the host (made if missing), eth0 with the next free IPv4 and "
        "IPv6 addresses of the subnets, and default routes via the bridge.",
    )
    create.add_argument("names", nargs="+", metavar="NAME", help="namespace names (letters, digits, _ . -)")
    create.add_argument(
        "--bridge", metavar="NAME", help="put the pods on this bridge, e.g. zds-br0 (default: none)"
    )
    create.add_argument("--subnet4", default="10.177.0.0/24", help="pod IPv4 subnet (default: %(default)s)")
    create.add_argument("--subnet6", default="fd00:177::/64", help="pod IPv6 subnet (default: %(default)s)")
    create.set_defaults(func=cmd_create)

    delete = commands.add_parser(
        "delete",
        help="delete named network namespaces",
        description="Delete named network namespaces (and, with --bridge, their veth). A namespace an "
        "enrolled pod lives in is refused while the node agent knows the pod (ask it over "
        "--control-socket): remove the pod first, or pass --force.",
    )
    delete.add_argument("names", nargs="+", metavar="NAME", help="namespace names")
    delete.add_argument(
        "--missing-ok", action="store_true", help="a namespace that does not exist is no error"
    )
    delete.add_argument(
        "--bridge", metavar="NAME", help="also delete this bridge once no pod is attached to it"
    )
    delete.add_argument(
        "--force", action="store_true", help="delete even a namespace an enrolled pod lives in"
    )
    delete.add_argument(
        "--control-socket",
        type=cliflags.unix_socket,  # (a path too long to stat was taken for no node agent: no check)
        default=defaults.CONTROL_SOCKET,
        metavar="PATH",
        help="the node agent to ask which namespaces enrolled pods use (default: %(default)s)",
    )
    delete.set_defaults(func=cmd_delete)

    listing = commands.add_parser(
        "list",
        help="list named network namespaces with their identity",
        description=f"List the named network namespaces in {defaults.NETNS_RUN_DIR}: name, path, "
        "identity (st_dev:st_ino, what ztunnel compares) and eth0's addresses.",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=cmd_list)


def _error(command: str, message: str) -> None:
    print(f"zds netns {command}: {message}", file=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    """Create each NAME; report each failure on its own line; exit 1 if any failed. SIGTERM
    is taken as Ctrl-C: what is half made is undone (it was left, never printed)."""
    with runtime.Interrupts():
        return _create(args)


def _create(args: argparse.Namespace) -> int:
    problem = runtime.privilege_error("netns create")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    from .errors import NetnsError
    from .fixtures import create_netns
    from .podnet import PodFixture, create_pods_on_bridge

    if args.bridge:

        def announce(pods: list[PodFixture]) -> None:
            for pod in pods:
                print(f"{pod.netns_path} {pod.ipv4} {pod.ipv6} bridge={args.bridge}")

        try:
            create_pods_on_bridge(args.names, args.bridge, args.subnet4, args.subnet6, announce)
        except NetnsError as e:
            _error("create", str(e))
            return 1
        return 0
    code = 0
    for name in args.names:
        try:
            with runtime.interrupts_held():  # (each one made is printed: an interrupt waits)
                print(create_netns(name))
        except NetnsError as e:
            _error("create", str(e))
            code = 1
    return code


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete each NAME; report each failure on its own line; exit 1 if any failed (SIGTERM
    taken as Ctrl-C)."""
    with runtime.Interrupts():
        return _delete(args)


def _delete(args: argparse.Namespace) -> int:
    problem = runtime.privilege_error("netns delete")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    from .errors import NetnsError
    from .links import remove_bridge_if_unused
    from .podnet import delete_pod

    code = 0
    in_use = {} if args.force else _enrolled_netns(args.control_socket)
    for name in args.names:
        pod = in_use.get(_identity_of(name))
        if pod is not None:
            uid, where = pod
            _error(
                "delete",
                f"netns {name} is the netns of enrolled pod {uid} ({where}); remove the pod first "
                f"(zds pod remove --uid {uid}), or pass --force",
            )
            code = 1
            continue
        try:
            # Its veth too, if zds netns made one (a netns the node agent holds outlives this,
            # and its pair with it: the veth stayed on the bridge, its address given again).
            delete_pod(name, missing_ok=args.missing_ok)
        except NetnsError as e:
            _error("delete", str(e))
            code = 1
    if args.bridge and not remove_bridge_if_unused(args.bridge):
        _error(  # (a note, not a failure: the exit code is the namespaces')
            "delete",
            f"note: bridge {args.bridge} kept: it does not exist, pods are still attached, or zds netns "
            "did not make it",
        )
    return code


def _identity_of(name: str) -> tuple[int, int] | None:
    from .fixtures import netns_path

    try:
        st = os.stat(netns_path(name))
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


#: How long ``zds netns delete`` waits for the node agent's list of pods (seconds).
LIST_PODS_TIMEOUT = 5.0


def _enrolled_netns(control_socket: str) -> dict[tuple[int, int] | None, tuple[str, str]]:
    """Netns identity -> (uid, "namespace/name") of each pod the node agent knows; empty when
    no node agent answers there (then nothing is known to be in use)."""
    try:
        os.stat(control_socket)
    except (FileNotFoundError, NotADirectoryError):
        return {}  # (no node agent there; any other error is said below, by the connection's)
    except OSError:
        pass
    from zds.gen import nodeagent_pb2
    from zds.server.controlclient import ControlError, ControlTarget

    target = ControlTarget(socket=control_socket)
    try:
        with target.stub() as stub:
            # (this command has no --timeout: the limit is its own, and not named as a flag)
            answer = target.call(stub.ListPods, nodeagent_pb2.ListPodsRequest(), LIST_PODS_TIMEOUT, flag=None)
    except ControlError as exc:
        print(
            f"zds netns delete: warning: {exc}; deleting without knowing whether a pod lives there",
            file=sys.stderr,
        )
        return {}
    return {
        (p.netns.dev, p.netns.ino): (p.uid, f"{p.namespace}/{p.name}")
        for p in answer.pods
        if p.HasField("netns")
    }


def _nsfs_dev() -> int | None:
    # All namespace inodes live on one nsfs superblock: its st_dev tells a bound
    # namespace from a stale plain file, without opening (which needs root).
    try:
        return os.stat("/proc/thread-self/ns/net").st_dev
    except OSError:
        return None


def _describe(name: str, nsfs_dev: int | None) -> dict[str, Any]:
    from .fixtures import netns_path
    from .kernel import NetnsIdentity
    from .links import pod_addresses

    path = netns_path(name)
    entry: dict[str, Any] = {"name": name, "path": path, "identity": None}
    try:
        st = os.stat(path)
    except OSError as e:
        entry["error"] = f"cannot stat {path}: {e.strerror}"
        return entry
    if stat.S_ISDIR(st.st_mode):
        entry["error"] = f"a directory, not a namespace; remove it with rmdir {path}"
        return entry
    if nsfs_dev is not None and st.st_dev != nsfs_dev:
        entry["error"] = f'not a namespace (stale entry?); remove it with "zds netns delete {name}"'
        return entry
    entry["identity"] = str(NetnsIdentity(st.st_dev, st.st_ino))
    entry["addresses"] = pod_addresses(path) if os.geteuid() == 0 else []
    return entry


def cmd_list(args: argparse.Namespace) -> int:
    """Print the named namespaces: name, path and identity (dev:ino), as a table or JSON
    (SIGTERM taken as Ctrl-C; either waits for the netlink socket a pod's addresses are read
    with to be closed: ``fixtures.iproute``)."""
    with runtime.Interrupts():
        return _list(args)


def _list(args: argparse.Namespace) -> int:
    from .fixtures import list_netns

    nsfs_dev = _nsfs_dev()
    try:
        entries = [_describe(name, nsfs_dev) for name in list_netns()]
    except OSError as e:
        _error("list", f"cannot list {defaults.NETNS_RUN_DIR}: {e.strerror}")
        return 1
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        return 0
    rows = [("NAME", "PATH", "IDENTITY", "ADDRESSES")]
    rows += [
        (
            e["name"],
            e["path"],
            e["identity"] or f"- ({e['error']})",
            " ".join(e.get("addresses", [])) or "-",
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    return 0
