"""Istio's native nftables backend for the in-pod rules (``cni/pkg/nftables``), in-process.

The same redirection as the iptables backend, as Istio writes it for nftables: three
``inet`` tables (``istio-ambient-nat``, ``-mangle``, ``-raw``), each with base chains
``prerouting``/``output`` jumping to ``istio-prerouting``/``istio-output``, IPv4 and (unless
``--no-ipv6``) IPv6 rules side by side in the same tables. The rule text is Istio's,
line for line (pinned by its golden files ``istio-inpod-nftables-*.golden``), and goes to
the kernel as **one transaction** through libnftables (Debian's ``libnftables1``, called
with ctypes from a worker thread inside the pod's netns): no process is forked, and a
reader of the pod's ruleset sees the old rules or the new ones, never half of them.

- install: ``add table``, ``flush table``, the chains, the rules (for each table that has
  rules) — re-applying replaces the tables' contents, so it is idempotent; then the policy
  routing (netlink, after the rules, in Istio's order for this backend);
- removal: ``add table`` + ``delete table`` for each of the three tables (Istio's way: a
  table that is already gone does not fail the transaction); then the policy routing.

Unlike Istio, a table the configuration does not use (``raw`` without DNS capture) is
deleted rather than left as it was, so a re-install after a configuration change leaves
exactly the rules of the new one.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import os
import re

from zds import defaults
from zds.server.inpodrules import RedirectConfig
from zds.server.redirect import (
    NothingChanged,
    RedirectError,
    Redirector,
    _routing,
    kernel_has_ipv6,
)

TABLES = ("istio-ambient-nat", "istio-ambient-mangle", "istio-ambient-raw")
LIBRARY = "libnftables.so.1"
#: nftables.h, enum nft_output_flags: no counters or quotas in listings.
_OUTPUT_STATELESS = 1 << 2

_MARK = f"mark and 0x{defaults.INPOD_MASK:x} != 0x{defaults.INPOD_MARK:x}"
_MARKED = f"meta mark and 0x{defaults.INPOD_MASK:x} == 0x{defaults.INPOD_MARK:x}"
_UNMARKED = f"meta mark and 0x{defaults.INPOD_MASK:x} != 0x{defaults.INPOD_MARK:x}"
_TPROXY = f"mark and 0x{defaults.INPOD_TPROXY_MASK:x} == 0x{defaults.INPOD_TPROXY_MARK:x}"


def nft_rules(config: RedirectConfig | None = None, *, ipv6: bool = False) -> str:
    """The transaction that installs Istio's in-pod rules (IPv6 ones too with ``ipv6``), in
    the order Istio's builder writes them."""
    config = config or RedirectConfig()
    fams = [("ip", "127.0.0.1/32", config.probe_snat_ipv4)]
    if ipv6:
        fams.append(("ip6", "::1/128", config.probe_snat_ipv6))
    pre, out = "istio-prerouting", "istio-output"
    nat: list[tuple[str, str]] = []
    nat += [(pre, f"meta l4proto tcp {ip} saddr {probe} counter accept") for ip, _, probe in fams]
    nat += [(out, f"meta l4proto tcp {ip} daddr {probe} counter accept") for ip, _, probe in fams]
    nat += [
        (
            pre,
            f"{ip} daddr != {lo} tcp dport != {config.inbound_hbone_port} {_MARK} counter "
            f"redirect to :{config.inbound_plaintext_port}",
        )
        for ip, lo, _ in fams
    ]
    if config.dns_capture:
        nat.append((out, f"oifname != lo {_MARK} udp dport 53 counter redirect to :{config.dns_port}"))
        nat += [
            (out, f"{ip} daddr != {lo} tcp dport 53 {_MARK} counter redirect to :{config.dns_port}")
            for ip, lo, _ in fams
        ]
    nat.append((out, f"meta l4proto tcp {_TPROXY} counter accept"))
    nat += [(out, f"oifname lo {ip} daddr != {lo} counter accept") for ip, lo, _ in fams]
    nat += [
        (out, f"meta l4proto tcp {ip} daddr != {lo} {_MARK} counter redirect to :{config.outbound_port}")
        for ip, lo, _ in fams
    ]
    keep = f"0x{(~defaults.INPOD_TPROXY_MASK) & 0xFFFFFFFF:x}"
    mangle = [
        (
            pre,
            f"meta mark & 0x{defaults.INPOD_MASK:x} == 0x{defaults.INPOD_MARK:x} counter "
            f"ct mark set ct mark & {keep} | 0x{defaults.INPOD_TPROXY_MARK:x}",
        ),
        (out, f"ct {_TPROXY} counter meta mark set ct mark"),
    ]
    raw = [
        (out, f"udp dport 53 {_MARKED} counter ct zone set 1"),
        (pre, f"udp sport 53 {_UNMARKED} counter ct zone set 1"),
    ]
    lines = _table("istio-ambient-nat", ("nat", "nat"), -100, nat, output_jump_first=True)
    lines += _table("istio-ambient-mangle", ("filter", "route"), -150, mangle)
    if config.dns_capture:
        lines += _table("istio-ambient-raw", ("filter", "filter"), -300, raw)
    else:
        lines += ["add table inet istio-ambient-raw", "delete table inet istio-ambient-raw"]
    return "\n".join(lines) + "\n"


def _table(
    name: str,
    types: tuple[str, str],
    priority: int,
    rules: list[tuple[str, str]],
    *,
    output_jump_first: bool = False,
) -> list[str]:
    """One table as Istio's builder writes it: add, flush, base chains (prerouting and
    output of ``types``), our chains, the jumps, the rules."""
    t = f"inet {name}"
    jumps = [f"add rule {t} prerouting jump istio-prerouting", f"add rule {t} output jump istio-output"]
    return [
        f"add table {t}",
        f"flush table {t}",
        f"add chain {t} prerouting {{ type {types[0]} hook prerouting priority {priority} ; }}",
        f"add chain {t} output {{ type {types[1]} hook output priority {priority} ; }}",
        f"add chain {t} istio-prerouting",
        f"add chain {t} istio-output",
        *(jumps[::-1] if output_jump_first else jumps),
        *(f"add rule {t} {chain} {rule}" for chain, rule in rules),
    ]


def removal() -> str:
    """The transaction that deletes our three tables (a missing one is no error)."""
    return "".join(f"add table inet {t}\ndelete table inet {t}\n" for t in TABLES)


class Libnftables:
    """libnftables' text API through ctypes: one context per call, made in the calling
    thread's netns (a context's netlink socket stays in the netns it was made in)."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as exc:
            raise RedirectError(
                f"the nftables backend needs {LIBRARY} ({exc}); install Debian's libnftables1 "
                "(apt-get install libnftables1), or use --redirect-backend iptables"
            ) from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
            fn.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        for fn in (lib.nft_run_cmd_from_buffer, lib.nft_run_cmd_from_filename):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            fn.restype = ctypes.c_int
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        self._lib = lib

    def run(self, commands: str, *, stateless: bool = False) -> str:
        """Run ``commands`` (one transaction); their output, or RedirectError with nft's words."""
        rc, output, error = self._call(commands, stateless=stateless)
        if rc != 0:
            # libnftables 1.0.6 quotes a buffer's first command for an error the kernel gives,
            # whichever command it was; read from a file, it names the right one: the same
            # commands again, as a dry run (the kernel checks them, nothing is applied).
            try:
                located = self._call(commands, dry_run=True)[2]
            except (OSError, RedirectError):  # (no fd left for the memfd, say: nft's own words)
                located = ""
            raise RedirectError(f"nftables transaction failed: {one_line(located or error) or f'error {rc}'}")
        return output

    def _call(self, commands: str, *, stateless: bool = False, dry_run: bool = False) -> tuple[int, str, str]:
        """(return code, output, error text) of ``commands``; ``dry_run``: checked, not applied,
        read from a memfd."""
        _check_fd_room()
        lib = self._lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise RedirectError("libnftables: cannot make a context (out of memory?)")
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            if stateless:
                lib.nft_ctx_output_set_flags(ctx, _OUTPUT_STATELESS)
            if dry_run:
                lib.nft_ctx_set_dry_run(ctx, True)
                fd = os.memfd_create("zds-nft", os.MFD_CLOEXEC)
                try:
                    os.write(fd, commands.encode())  # (a memfd takes it all at once)
                    rc = lib.nft_run_cmd_from_filename(ctx, f"/proc/self/fd/{fd}".encode())
                finally:
                    os.close(fd)
            else:
                rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            output = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace") if rc else ""
            return rc, output, error
        finally:
            lib.nft_ctx_free(ctx)


#: An error line of libnftables: ``Error: ...``, or ``FILE:LINE:COLUMNS: Error: ...``.
_ERROR_RE = re.compile(r"^(?:\S+:\d+:[\d-]+: )?Error: (.*)$")


def one_line(error: str) -> str:
    """libnftables' errors in one line: each ``Error: ...`` once, with the command it names
    (its own text quotes that command on the next line and underlines a part with carets)."""
    lines = error.splitlines()
    said = []
    for i, line in enumerate(lines):
        if m := _ERROR_RE.match(line):
            command = lines[i + 1].strip() if i + 1 < len(lines) else ""
            at = f" (at: {command})" if command and not _ERROR_RE.match(command) and command[0] != "^" else ""
            said.append(m.group(1) + at)
    return "; ".join(dict.fromkeys(said)) or " ".join(error.split())


#: libnftables 1.0.6 waits for the kernel's answer with select(): a context whose netlink
#: socket got a number past FD_SETSIZE would abort the whole process (glibc's fortify check).
FD_SETSIZE = 1024


def _check_fd_room() -> None:
    """Refuse, instead of aborting, when the next fd would be past FD_SETSIZE (the node agent
    keeps its pods' fds above it, so this takes ~1,000 other open fds)."""
    probe = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(probe)
    if probe >= FD_SETSIZE - 8:
        raise RedirectError(
            f"libnftables cannot run with fd numbers past {FD_SETSIZE} (it waits with select()) and "
            f"fd {probe} is the lowest free one; use --redirect-backend iptables"
        )


@functools.cache
def libnftables() -> Libnftables:
    return Libnftables()


def our_tables(ruleset: str) -> list[str]:
    """The lines of our three tables in a ``list ruleset`` output (in the order listed)."""
    lines: list[str] = []
    inside = False
    for line in ruleset.split("\n"):  # (a newline only: a comment of the pod's may hold \x1c or \r)
        if line.startswith("table "):
            inside = line.split()[1:3] in (["inet", t] for t in TABLES)
        if inside and line.strip():
            lines.append(line.strip())
        if line == "}":
            inside = False
    return lines


class NftablesRedirector(Redirector):
    """Istio's nftables backend: one libnftables transaction in the pod's netns."""

    name = "nftables"

    def __init__(self, config: RedirectConfig | None = None) -> None:
        super().__init__(config or RedirectConfig())
        # Checked now: a node agent told to use nftables where it cannot stops at start-up.
        libnftables()
        ipaddress.ip_address(self.config.probe_snat_ipv6)
        #: What the kernel lists after each rule text (IPv4 only, or both) went into a netns
        #: that had none of our tables, and the policy routing as ours, as a digest.
        self._fresh_digests: dict[str, str] = {}

    def rule_texts(self) -> list[str]:
        return [nft_rules(self.config, ipv6=self.config.ipv6)]

    def _install_here(self) -> tuple[list[int], str]:
        ipv6 = self.config.ipv6
        rules = nft_rules(self.config, ipv6=ipv6)
        lib = libnftables()
        # Istio's transaction flushes our tables but keeps chains it does not name, so what
        # the kernel lists afterwards is the same in every netns only where none of our
        # tables was there before (~0.2 ms to ask, where listing the ruleset takes ~0.6 ms,
        # as long as the install itself): there the listing of the first such pod serves.
        try:
            fresh = not our_tables(lib.run("list tables inet"))
            lib.run(rules)
        except RedirectError as exc:  # (one transaction: the kernel took none of it)
            raise NothingChanged(f"{exc}; nothing was changed") from exc
        routing = self._add_routing()
        digest = self._fresh_digests.get(rules) if fresh and routing else None
        if digest is None:
            digest = self._digest_here(routing=routing)
            if fresh and routing:
                self._fresh_digests[rules] = digest
        return [4, 6] if ipv6 else [4], digest

    def _remove_here(self, *, routing: bool = True) -> None:
        try:
            libnftables().run(removal())
        finally:
            if routing:
                _routing(add=False, ipv6=kernel_has_ipv6())  # both families, whatever is configured now

    def _digest_here(self, *, routing: bool | None = None) -> str:
        """The digest of our tables as the kernel lists them and of the policy routing
        (``routing``: known to be there, just added: not asked again)."""
        # (the inet family only, where ours are: the pod's iptables-nft tables are not parsed,
        # whose xt targets libnftables cannot print, each said on stderr: "XT target ... not found")
        return self._digest(our_tables(libnftables().run("list ruleset inet", stateless=True)), routing)
