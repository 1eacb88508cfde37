"""``zds ztunnel``: the ztunnel side, on the command line.

Flag names are a contract (DESIGN.md §8); ports, paths and timeouts default
to ``zds.defaults``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from zds import cliflags, defaults, limits, runtime


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``ztunnel`` command."""
    p = sub.add_parser(
        "ztunnel",
        help="the ztunnel side: take pods from a node agent, listen inside each pod's netns",
        description=(
            "Connect to a ZDS node agent (zds server, or Istio's CNI node agent), take its "
            "snapshot, and open each enrolled pod's listeners inside the pod's network namespace "
            "(TCP 15001 outbound, 15006 inbound, 15008 HBONE; UDP and TCP 15053 DNS on the pod's "
            "loopback), acking every message as ztunnel does. "
            "HTTP listen flags take HOST:PORT (port 0: any free port, logged) or 'off'."
        ),
    )
    p.add_argument(
        "--zds-socket",
        type=cliflags.unix_socket,
        default=defaults.ZDS_SOCKET,
        metavar="PATH",
        help="the node agent's ZDS socket (default: %(default)s; ztunnel's INPOD_UDS)",
    )
    p.add_argument(
        "--admin-listen",
        default=defaults.ADMIN_LISTEN,
        metavar="HOST:PORT",
        help="admin endpoint, /config_dump (default: %(default)s)",
    )
    p.add_argument(
        "--readiness-listen",
        default=defaults.READINESS_LISTEN,
        metavar="HOST:PORT",
        help="readiness endpoint, /healthz/ready (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default=defaults.METRICS_LISTEN,
        metavar="HOST:PORT",
        help="metrics endpoint, /metrics in ztunnel's OpenMetrics text (default: %(default)s)",
    )
    p.add_argument(
        "--no-listeners",
        action="store_true",
        help="protocol only: check each netns fd and ack, but open no socket in the pods",
    )
    p.add_argument(
        "--outbound-port",
        type=cliflags.port,
        default=defaults.OUTBOUND_PORT,
        metavar="PORT",
        help="in-pod listener the rules send outgoing TCP to (default: %(default)s)",
    )
    p.add_argument(
        "--inbound-port",
        type=cliflags.port,
        default=defaults.INBOUND_PLAINTEXT_PORT,
        metavar="PORT",
        help="in-pod listener the rules send incoming TCP to (default: %(default)s)",
    )
    p.add_argument(
        "--hbone-port",
        type=cliflags.port,
        default=defaults.INBOUND_HBONE_PORT,
        metavar="PORT",
        help="in-pod HBONE listener; zds speaks no HBONE and closes what arrives (default: %(default)s)",
    )
    p.add_argument(
        "--dns-port",
        type=cliflags.port,
        default=defaults.DNS_PORT,
        metavar="PORT",
        help="in-pod DNS forwarder, UDP and TCP (default: %(default)s; where the in-pod rules send DNS)",
    )
    p.add_argument("--no-dns", action="store_true", help="no DNS forwarder in the pods")
    p.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        metavar="ADDR[:PORT]",
        help="resolver the DNS forwarder asks (repeatable) (default: the node's /etc/resolv.conf)",
    )
    p.add_argument(
        "--no-preserve-source",
        action="store_true",
        help="inbound relays connect from the pod's own address instead of the client's (no IP_TRANSPARENT)",
    )
    p.add_argument(
        "--mark",
        type=cliflags.mark,
        default=defaults.ZTUNNEL_MARK,
        help="SO_MARK on the sockets made in pods (default: %(default)s, ztunnel's PACKET_MARK)",
    )
    p.add_argument(
        "--no-port-reuse",
        action="store_true",
        help="no SO_REUSEPORT on in-pod listeners (ztunnel's INPOD_PORT_REUSE=false); "
        "then a second ztunnel cannot serve a pod the first still serves",
    )
    p.add_argument(
        "--retry-interval",
        type=cliflags.seconds,
        default=defaults.PENDING_RETRY_INTERVAL,
        metavar="SECONDS",
        help="retry pending proxies this often (default: %(default)s, ztunnel's)",
    )
    cliflags.add_busy_poll_flag(p, "the node agent's next message after each ack")
    p.add_argument(
        "--drain-timeout",
        type=cliflags.seconds,
        default=defaults.DRAIN_TIMEOUT,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT/SIGHUP, wait this long for established connections (default: %(default)s)",
    )
    p.add_argument(
        "--allow-own-netns",
        action="store_true",
        help="serve a pod whose netns is ztunnel's own (the node's); refused by default",
    )
    p.add_argument(
        "--faults",
        metavar="FILE",
        help="faults to arm at start, to test a node agent (YAML or JSON lines of {kind, count, delay, text, after}; "
        "POST /faults on the admin endpoint arms more) (default: none)",
    )
    p.add_argument(
        "--faults-api",
        action="store_true",
        help="serve POST /faults on the admin endpoint without --faults (off by default: whoever "
        "reaches the admin port could make this ztunnel nack pods or stop reading)",
    )
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    p.set_defaults(func=main, starts_itself=True)  # runtime.run ends its start-up


def main(args: argparse.Namespace) -> int:
    """Run ``zds ztunnel`` until a signal (0) or a fatal protocol error (1)."""
    # Nothing here loads asyncio before the first snapshot is in (zds.client.session).
    from zds.client.admin import ListenAddressError, parse_listen
    from zds.client.config import ZtunnelConfig, ZtunnelParts
    from zds.client.inpod import default_specs, node_resolvers, parse_resolver
    from zds.client.workloads import ProxySettings

    ports = [args.outbound_port, args.inbound_port, args.hbone_port] + (
        [] if args.no_dns else [args.dns_port]
    )
    if len(set(ports)) != len(ports):
        print(f"zds ztunnel: the in-pod ports must differ, got {ports}", file=sys.stderr)
        return 2
    for flag in ("admin_listen", "readiness_listen", "metrics_listen"):
        value = getattr(args, flag)
        if value.strip().lower() in ("off", "none", ""):
            continue
        try:
            parse_listen(value)
        except ListenAddressError as exc:
            print(f"zds ztunnel: --{flag.replace('_', '-')}: {exc}", file=sys.stderr)
            return 2
    try:
        resolvers = [parse_resolver(r) for r in args.dns_upstream] or node_resolvers()
    except ValueError as exc:
        print(f"zds ztunnel: --dns-upstream: {exc}", file=sys.stderr)
        return 2
    if not args.no_listeners:
        # setns and SO_MARK need these (ztunnel checks them at start-up too).
        problem = runtime.privilege_error("ztunnel", ("CAP_SYS_ADMIN", "CAP_NET_ADMIN"))
        if problem:
            print(f"{problem} (or run with --no-listeners)", file=sys.stderr)
            return 1
    config = ZtunnelConfig(
        zds_socket=args.zds_socket,
        admin_listen=args.admin_listen,
        readiness_listen=args.readiness_listen,
        metrics_listen=args.metrics_listen,
        proxy=ProxySettings(
            listeners=not args.no_listeners,
            specs=default_specs(args.outbound_port, args.inbound_port, args.hbone_port),
            mark=args.mark,
            reuse_port=not args.no_port_reuse,
            dns_port=None if args.no_dns else args.dns_port,
            resolvers=tuple(resolvers),
            preserve_source=not args.no_preserve_source,
            allow_own_netns=args.allow_own_netns,
        ),
        retry_interval=args.retry_interval,
        busy_poll=args.busy_poll,
        drain_timeout=args.drain_timeout,
        faults_file=args.faults,
        faults_api=args.faults_api,
    )
    limits.raise_fd_limit()  # as ztunnel: a pod takes 7 fds (see zds.client.workloads)
    limits.grow_fd_table(defaults.FD_TABLE_ENTRIES)
    parts = ZtunnelParts.build(config)
    parts.stop_signals.install()  # a stop from here on is graceful (the loop acts on it)
    handover = None
    if not config.faults_file:  # faults are armed on the event loop: no blocking start then
        try:
            parts.prepare(config)
        except ListenAddressError as exc:
            print(f"zds ztunnel: {exc}", file=sys.stderr)
            return 1
        handover = parts.take_first_snapshot(config)
    from zds.client.app import Ztunnel
    from zds.client.faults import ZtunnelFaultError

    try:
        ztunnel = Ztunnel(config, parts=parts, handover=handover)
    except ZtunnelFaultError as exc:
        print(f"zds ztunnel: --faults: {exc}", file=sys.stderr)
        return 2
    try:
        runtime.run(ztunnel.run(), use_uvloop=not args.no_uvloop)  # (the process ends in it once served)
    except ListenAddressError as exc:
        print(f"zds ztunnel: {exc}", file=sys.stderr)
        return 1
