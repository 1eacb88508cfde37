"""``zds server``: the node agent's command line (the flags; ``main`` runs it)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from zds import cliflags, defaults, limits, runtime


def register(sub: argparse._SubParsersAction[Any]) -> None:
    server = sub.add_parser(
        "server",
        help="run the node agent (the ZDS server ztunnel connects to)",
        description="Run the node agent: listen on the ZDS socket, deliver pods to ztunnel, "
        "serve the control API (gRPC), the CNI plugin endpoint and health checks.",
    )
    server.add_argument(
        "--zds-socket",
        default=defaults.ZDS_SOCKET,
        metavar="PATH",
        help="ZDS socket ztunnel connects to, ztunnel's INPOD_UDS (default: %(default)s)",
    )
    server.add_argument(
        "--control-socket",
        default=defaults.CONTROL_SOCKET,
        metavar="PATH",
        help="gRPC control API socket (default: %(default)s)",
    )
    server.add_argument(
        "--grpc-listen",
        metavar="HOST:PORT",
        help="also serve the control API on TCP; needs --tls-cert and --tls-key, or --grpc-insecure "
        "(default: off)",
    )
    server.add_argument("--tls-cert", metavar="FILE", help="the control API's TLS certificate on TCP (PEM)")
    server.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    server.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require client certificates signed by this CA on TCP: mutual TLS (default: none)",
    )
    server.add_argument(
        "--grpc-insecure",
        action="store_true",
        help="serve --grpc-listen in plaintext, without authentication (a warning is logged at start)",
    )
    server.add_argument(
        "--allow-uid",
        type=_id,
        action="append",
        default=[],
        metavar="UID",
        help="another uid that may connect to the unix sockets (repeatable; an ACL entry opens the socket "
        "files to it) (default: root and the server's own uid)",
    )
    server.add_argument(
        "--allow-gid",
        type=_id,
        action="append",
        default=[],
        metavar="GID",
        help="a gid whose members may connect to the unix sockets (repeatable; an ACL entry opens the "
        "socket files to it) (default: none)",
    )
    server.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="give the socket files this group, mode 0660, and let it connect (default: root only, 0600)",
    )
    server.add_argument(
        "--netns-root",
        action="append",
        default=[],
        metavar="DIR",
        help="another directory that holds pods' named namespaces (repeatable) (default: "
        "/var/run/netns and /run/netns, plus any /proc/PID/ns/net)",
    )
    server.add_argument(
        "--cni-socket",
        default=defaults.CNI_SOCKET,
        metavar="PATH",
        help="CNI plugin event socket, POST /cmdadd; 'off' disables (default: %(default)s)",
    )
    server.add_argument(
        "--cni-request-timeout",
        type=cliflags.seconds,
        default=10.0,
        metavar="SECONDS",
        help="a CNI plugin request must arrive (headers, then body) within this (default: %(default)s)",
    )
    server.add_argument(
        "--cni-max-requests",
        type=cliflags.positive_int,
        default=64,
        metavar="N",
        help="CNI plugin requests in flight at once; more are answered 503 at once (default: %(default)s)",
    )
    server.add_argument(
        "--http-listen",
        default=defaults.NODE_AGENT_HTTP,
        metavar="HOST:PORT",
        help="/healthz, /readyz and /metrics; 'off' disables (default: %(default)s)",
    )
    server.add_argument(
        "--max-connections",
        type=cliflags.positive_int,
        default=defaults.MAX_CONNECTIONS,
        metavar="N",
        help="concurrent ztunnel connections (default: %(default)s)",
    )
    server.add_argument(
        "--ack-timeout",
        type=cliflags.seconds,
        default=defaults.ACK_TIMEOUT,
        metavar="SECONDS",
        help="ack deadline; a connection that misses it is closed (default: %(default)s)",
    )
    server.add_argument(
        "--hello-timeout",
        type=cliflags.seconds,
        default=defaults.HELLO_TIMEOUT,
        metavar="SECONDS",
        help="how long a new connection may take to say hello (default: %(default)s)",
    )
    server.add_argument(
        "--keepalive-interval",
        type=cliflags.seconds,
        default=defaults.KEEPALIVE_INTERVAL,
        metavar="SECONDS",
        help="probe an idle connection this often (default: %(default)s)",
    )
    cliflags.add_busy_poll_flag(server, "each ack")
    server.add_argument(
        "--state-dir",
        default=defaults.STATE_DIR,
        metavar="DIR",
        help="where the pod store (pods.db) and the instance lock live; pods survive restarts "
        "(default: %(default)s)",
    )
    server.add_argument(
        "--reset-state",
        action="store_true",
        help="start with an empty pod store: an existing pods.db is moved aside (pods.db.TIME.bak), "
        "never deleted; ztunnel then drops the pods it holds",
    )
    server.add_argument(
        "--pods",
        metavar="FILE",
        help="pods to enroll at start-up: JSON lines, a JSON array or YAML; a uid the pod store "
        "already holds keeps the stored pod (default: none)",
    )
    server.add_argument(
        "--container-engine",
        metavar="SOCKET",
        help="a Docker-compatible API socket (podman system service's, e.g. /run/podman/podman.sock, or "
        "Docker's): its containers labelled istio.io/dataplane-mode=ambient become pods, and zds-cni's "
        "events are decided by their labels (default: off)",
    )
    server.add_argument(
        "--container-label",
        action="append",
        default=[],
        type=_label_filter,
        metavar="KEY[=VALUE]",
        help="with --container-engine: only containers carrying this label are this node agent's "
        "(checked on every container the engine reports; repeat to require several) (default: every container)",
    )
    server.add_argument(
        "--faults",
        metavar="FILE",
        help="faults to arm at start-up, for the first ztunnel connection (YAML or JSON lines; see "
        "zds fault --help) (default: none)",
    )
    server.add_argument("--no-redirect", action="store_true", help="do not install in-pod redirection rules")
    server.add_argument(
        "--redirect-backend",
        choices=defaults.REDIRECT_BACKENDS,
        default=defaults.REDIRECT_BACKEND,
        help="how the in-pod rules go in: Istio's iptables rules (iptables-restore in the pod) or "
        "its native nftables rules (one libnftables transaction, no process forked) "
        "(default: %(default)s)",
    )
    server.add_argument(
        "--no-dns-capture",
        action="store_true",
        help="install the rules without DNS capture (UDP/TCP 53 -> 15053 is left out)",
    )
    server.add_argument(
        "--no-ipv6",
        action="store_true",
        help="install the IPv4 rules and policy routing only (Istio's AMBIENT_IPV6=false); by default "
        "every pod gets the IPv6 ones too, whatever addresses it has, as Istio's",
    )
    server.add_argument(
        "--netns-sweep",
        type=cliflags.seconds_or_never,
        default=defaults.NETNS_SWEEP,
        metavar="SECONDS",
        help="look this often for the pods of CNI events whose netns nothing holds any more (no "
        "process, no name, no mount: the pod is gone, and no DEL came) and remove them "
        "(default: never)",
    )
    server.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    server.add_argument(
        "--watch-queue",
        type=cliflags.positive_int,
        default=defaults.WATCH_QUEUE,
        metavar="EVENTS",
        help="events a Watch stream may have waiting before it is ended with RESOURCE_EXHAUSTED "
        "(default: %(default)s)",
    )
    server.set_defaults(func=main, starts_itself=True)  # runtime.run ends its start-up


def main(args: argparse.Namespace) -> int:
    """Run ``zds server`` until SIGTERM/SIGINT (0), or say in one line why it cannot start (1)."""
    error = runtime.privilege_error("server")
    if error:
        print(error, file=sys.stderr)
        return 1
    try:
        from zds.server.agent import AgentConfig
        from zds.server.inpodrules import RedirectConfig
        from zds.server.options import ServerOptions
        from zds.server.peers import AllowList
        from zds.server.run import run_server
        from zds.server.unixhttp import HttpLimits
    except ValueError as exc:  # (OpenTelemetry's SDK reads some OTEL_* values as it is imported)
        if not any(k.startswith("OTEL_") for k in os.environ):
            raise  # (none set: a bug, not a setting)
        print(
            f"zds server: cannot set up OpenTelemetry: an OTEL_* setting the SDK refuses ({exc})",
            file=sys.stderr,
        )
        return 1

    try:
        gid = _group(args.socket_group) if args.socket_group else None
    except LookupError as exc:
        print(f"zds server: --socket-group: {exc}", file=sys.stderr)
        return 2
    options = ServerOptions(
        zds_socket=args.zds_socket,
        control_socket=args.control_socket,
        grpc_listen=args.grpc_listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        grpc_insecure=args.grpc_insecure,
        netns_roots=tuple(args.netns_root),
        socket_mode=0o660 if gid is not None else defaults.SOCKET_MODE,
        socket_gid=gid,
        cni_socket=cliflags.off(args.cni_socket),
        cni_limits=HttpLimits(
            header_timeout=args.cni_request_timeout,
            body_timeout=args.cni_request_timeout,
            max_concurrent=args.cni_max_requests,
        ),
        http_listen=cliflags.off(args.http_listen),
        state_dir=args.state_dir,
        reset_state=args.reset_state,
        pods_file=args.pods,
        container_engine=cliflags.off(args.container_engine),
        container_label=tuple(args.container_label),
        netns_sweep=args.netns_sweep,
        faults_file=args.faults,
        redirect=not args.no_redirect,
        redirect_backend=args.redirect_backend,
        redirect_config=RedirectConfig(dns_capture=not args.no_dns_capture, ipv6=not args.no_ipv6),
        agent=AgentConfig(
            max_connections=args.max_connections,
            ack_timeout=args.ack_timeout,
            hello_timeout=args.hello_timeout,
            keepalive_interval=args.keepalive_interval,
            busy_poll=args.busy_poll,
            watch_queue=args.watch_queue,
            allow=AllowList.default(args.allow_uid, [*args.allow_gid, *([gid] if gid is not None else [])]),
        ),
    )
    soft, hard = limits.raise_fd_limit()  # as Go does for Istio's node agent: a pod takes 1 fd (its netns)
    if soft < defaults.NODE_AGENT_MIN_FDS:  # (before anything is opened or claimed: nothing to undo)
        logging.getLogger("zds.server").error(
            "RLIMIT_NOFILE is %d (hard limit %d): the node agent keeps %d fds free and needs at least "
            "%d to start; raise the limit (ulimit -n, LimitNOFILE)",
            soft,
            hard,
            defaults.NODE_AGENT_FD_RESERVE,
            defaults.NODE_AGENT_MIN_FDS,
        )
        return 1
    if soft < 2 * defaults.NODE_AGENT_FD_RESERVE:
        logging.getLogger("zds.server").warning(
            "RLIMIT_NOFILE is %d: %d fds are kept free, so at most ~%d pods can be enrolled; "
            "raise the limit (ulimit -n, LimitNOFILE)",
            soft,
            defaults.NODE_AGENT_FD_RESERVE,
            max(0, soft - defaults.NODE_AGENT_FD_RESERVE - 40),
        )
    limits.grow_fd_table(defaults.FD_TABLE_ENTRIES)  # before gRPC starts its threads
    return runtime.run(run_server(options), use_uvloop=not args.no_uvloop)


def _id(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not _id_in_range(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a numeric id (0-{GID_MAX})")
    return int(text)


def _id_in_range(digits: str) -> bool:
    """Whether a number written in ``digits`` is a uid or gid (int() refuses over 4,300 digits;
    past gid_t it was an OverflowError at the chown, and its -1 is chown's "no change")."""
    return len(digits) <= 10 and int(digits) <= GID_MAX


#: The largest gid (gid_t's (gid_t)-1 is chown's "no change").
GID_MAX = 2**32 - 2


def _group(name: str) -> int:
    """A group's gid, by name or number."""
    import grp

    if name.isascii() and name.isdigit():
        if not _id_in_range(name):
            raise LookupError(f"{name!r} is not a gid (0-{GID_MAX})")
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise LookupError(f"no group named {name!r}") from None


def _label_filter(text: str) -> str:
    """``--container-label``: ``KEY`` or ``KEY=VALUE`` with a key (an empty one matched no
    container, silently: the node agent then enrolled nothing from the engine)."""
    key = text.partition("=")[0]
    if not key.strip() or key != key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY or KEY=VALUE with a label key")
    from zds.server.containers import EVENT_ATTRIBUTES

    if key in EVENT_ATTRIBUTES:
        # (the engines' events carry the container's name, image, ... under these keys, over a
        # label of the same name: a container's create event could not say it is this agent's)
        raise argparse.ArgumentTypeError(
            f"{text!r}: the container engines' events use the key {key!r} for their own attribute; "
            "label the containers with another key"
        )
    return text
