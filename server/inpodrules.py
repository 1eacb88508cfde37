"""Istio's in-pod iptables rules as ``iptables-restore`` input: the same rules, order and
spelling as Istio's in-pod rule builder (pinned by the golden files in
``../shared/upstream``), and what varies between pods and nodes (``RedirectConfig``).
Applied by redirect.py; the nftables backend installs the same rules (nftables.py)."""

from __future__ import annotations

import dataclasses

from zds import defaults

PRERT = defaults.CHAIN_PREROUTING
OUTPUT = defaults.CHAIN_OUTPUT
MARK = f"0x{defaults.INPOD_MARK:x}/0x{defaults.INPOD_MASK:x}"
TPROXY_MARK = f"0x{defaults.INPOD_TPROXY_MARK:x}/0x{defaults.INPOD_TPROXY_MASK:x}"
RESTORE_MASK = f"0x{defaults.INPOD_RESTORE_MASK:x}"

#: (table, built-in chain, our chain) jumps, in the order Istio appends them.
JUMPS = (
    ("mangle", "PREROUTING", PRERT),
    ("mangle", "OUTPUT", OUTPUT),
    ("nat", "OUTPUT", OUTPUT),
    ("raw", "PREROUTING", PRERT),  # DNS capture only
    ("raw", "OUTPUT", OUTPUT),  # DNS capture only
    ("nat", "PREROUTING", PRERT),
)


@dataclasses.dataclass(frozen=True)
class RedirectConfig:
    """What varies between pods and nodes."""

    dns_capture: bool = True
    #: The IPv6 rules and policy routing too, in every pod whatever addresses it has (Istio's
    #: AMBIENT_IPV6, on by default); off: IPv4 only (``zds server --no-ipv6``, or a kernel
    #: without IPv6).
    ipv6: bool = True
    probe_snat_ipv4: str = defaults.HOST_PROBE_SNAT_IPV4
    probe_snat_ipv6: str = defaults.HOST_PROBE_SNAT_IPV6
    outbound_port: int = defaults.OUTBOUND_PORT
    inbound_plaintext_port: int = defaults.INBOUND_PLAINTEXT_PORT
    inbound_hbone_port: int = defaults.INBOUND_HBONE_PORT
    dns_port: int = defaults.DNS_PORT


def inpod_rules(family: int, config: RedirectConfig = RedirectConfig()) -> str:
    """The ``iptables-restore`` input for one address family (4 or 6)."""
    local = "127.0.0.1/32" if family == 4 else "::1/128"
    probe = config.probe_snat_ipv4 if family == 4 else config.probe_snat_ipv6
    tables: dict[str, list[str]] = {"mangle": [], "nat": [], "raw": []}
    chains: dict[str, list[str]] = {"mangle": [], "nat": [], "raw": []}
    for table, builtin, chain in JUMPS:
        if table == "raw" and not config.dns_capture:
            continue
        if chain not in chains[table]:
            chains[table].append(chain)
        tables[table].append(f"-A {builtin} -j {chain}")
    mangle, nat, raw = tables["mangle"], tables["nat"], tables["raw"]

    # Traffic ztunnel sent (marked) gets a connmark, so replies can be recognised.
    mangle.append(f"-A {PRERT} -m mark --mark {MARK} -j CONNMARK --set-xmark {TPROXY_MARK}")
    # Kubelet probes arrive SNATed from a fixed address: let them (and their replies) through.
    nat.append(f"-A {PRERT} -s {probe} -p tcp -m tcp -j ACCEPT")
    nat.append(f"-A {OUTPUT} -d {probe} -p tcp -m tcp -j ACCEPT")
    # Inbound TCP not for localhost, not HBONE, not from ztunnel: to the inbound plaintext listener.
    nat.append(
        f"-A {PRERT} ! -d {local} -p tcp ! --dport {config.inbound_hbone_port} -m mark ! --mark {MARK} "
        f"-j REDIRECT --to-ports {config.inbound_plaintext_port}"
    )
    mangle.append(
        f"-A {OUTPUT} -m connmark --mark {TPROXY_MARK} -j CONNMARK --restore-mark "
        f"--nfmask {RESTORE_MASK} --ctmask {RESTORE_MASK}"
    )
    if config.dns_capture:
        nat.append(
            f"-A {OUTPUT} ! -o lo -p udp -m mark ! --mark {MARK} -m udp --dport 53 "
            f"-j REDIRECT --to-port {config.dns_port}"
        )
        nat.append(
            f"-A {OUTPUT} ! -d {local} -p tcp --dport 53 -m mark ! --mark {MARK} "
            f"-j REDIRECT --to-ports {config.dns_port}"
        )
        # ztunnel's own DNS upstream traffic gets its own conntrack zone (port collisions).
        raw.append(f"-A {OUTPUT} -p udp -m mark --mark {MARK} -m udp --dport 53 -j CT --zone 1")
        raw.append(f"-A {PRERT} -p udp -m mark ! --mark {MARK} -m udp --sport 53 -j CT --zone 1")
    # Replies of connections ztunnel handled, and the pod talking to itself over lo, go direct.
    nat.append(f"-A {OUTPUT} -p tcp -m mark --mark {TPROXY_MARK} -j ACCEPT")
    nat.append(f"-A {OUTPUT} ! -d {local} -o lo -j ACCEPT")
    # Everything else outbound, unless ztunnel sent it: to the outbound listener.
    nat.append(
        f"-A {OUTPUT} ! -d {local} -p tcp -m mark ! --mark {MARK} -j REDIRECT --to-ports {config.outbound_port}"
    )

    out = []
    for table in ("mangle", "nat", "raw"):
        if not tables[table]:
            continue
        out.append(f"* {table}")
        out += [f"-N {chain}" for chain in _chain_order(table, chains[table])]
        out += tables[table]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def _chain_order(table: str, chains: list[str]) -> list[str]:
    # Istio declares the chains in the order its builder first saw them per table.
    return [OUTPUT, PRERT] if table == "raw" else [PRERT, OUTPUT]
