"""In-pod traffic redirection: Istio's in-pod iptables rules, installed by the
node agent inside each enrolled pod's network namespace.

With these rules and the ztunnel side's listeners, a pod's outbound TCP goes to
15001, inbound TCP (except to 15008) to 15006, DNS to 15053, and whatever
carries ztunnel's mark (0x539) is left alone. The rule text (``inpodrules``: the
same rules, order and spelling as Istio's in-pod rule builder, pinned by the
golden files in ``../shared/upstream``) is applied with ``iptables-restore
--noflush`` from a worker thread inside the namespace, after removing any
earlier copy of our chains, so re-applying is idempotent.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from zds import limits
from zds.errors import printable
from zds.netns import NetnsHandle, run_in_netns
from zds.server.inpodrules import RedirectConfig, inpod_rules
from zds.server.iptablesave import cleanup_rules, foreign_jumps, our_lines
from zds.server.iptablesrun import NothingChanged as NothingChanged
from zds.server.iptablesrun import RedirectError as RedirectError
from zds.server.iptablesrun import RulesNotOurs as RulesNotOurs
from zds.server.iptablesrun import UnreadableSave as UnreadableSave
from zds.server.iptablesrun import remove_family, remove_family_unread, run_tool, save

log = logging.getLogger("zds.server.redirect")


def _families(ipv6: bool) -> list[tuple[int, str]]:
    return [(4, "iptables")] + ([(6, "ip6tables")] if ipv6 else [])


def _routing(add: bool, *, ipv6: bool) -> bool:
    """``policy_routing`` (whether the rule is ours now), its failure a RedirectError."""
    from zds.server.policyrouting import PolicyRoutingError, policy_routing

    try:
        return policy_routing(add=add, ipv6=ipv6)
    except PolicyRoutingError as exc:
        raise RedirectError(str(exc)) from exc


def _routing_present(ipv6: bool) -> bool:
    from zds.server.policyrouting import PolicyRoutingError, policy_routing_present

    try:
        return policy_routing_present(ipv6=ipv6)
    except PolicyRoutingError as exc:
        raise RedirectError(str(exc)) from exc


@dataclasses.dataclass(frozen=True)
class Installed:
    """What an install did: the address families covered, and the digest of the rules now there."""

    families: list[int]
    digest: str


#: Rule installs and removals a node agent runs at a time, each in a worker thread inside a
#: pod's netns. Most of a removal is waiting in the kernel (an RCU grace period before the
#: old rules go: ~12 ms here), so many at a time is what makes removals fast.
RULE_WORKERS = 32
_executor: ThreadPoolExecutor | None = None


def rules_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(RULE_WORKERS, thread_name_prefix="zds-rules")
    return _executor


class Redirector:
    """Installs and removes the in-pod rules; shared by every enrollment of a node agent.

    This one is Istio's iptables backend (iptables-save + iptables-restore run inside the
    pod's netns); ``zds.server.nftables.NftablesRedirector`` is Istio's native nftables one.
    Each records its ``name`` and the ``digest`` of what it installed in the pod store, so a
    restart can tell whether the rules are still the same, or from the other backend."""

    #: The rule set's name, as the pod store records it.
    name = "iptables"

    def __init__(self, config: RedirectConfig = RedirectConfig()) -> None:
        self.config = config
        # In every digest: rules a node agent with another configuration installed (before a
        # restart with --no-dns-capture, say) are not in place, and go in again (as Istio's
        # reconcile at start-up replaces rules that differ from what it would install).
        texts = "".join(self.rule_texts()).encode()
        self._config_line = f"config {hashlib.sha256(texts).hexdigest()[:16]}"
        #: The digest of what the last whole install left (the same in every pod: our rules
        #: only), which a netns whose rules of ours are all in place has too.
        self._whole: str | None = None

    def rule_texts(self) -> list[str]:
        """Every text this configuration installs (each family's)."""
        return [inpod_rules(family, self.config) for family in ((4, 6) if self.config.ipv6 else (4,))]

    async def install(self, netns: NetnsHandle) -> Installed:
        """Install (or re-install) the rules in ``netns``."""
        families, digest = await run_in_netns(netns, self._install_here, executor=rules_executor())
        return Installed(families, digest)

    async def remove(self, netns: NetnsHandle, *, routing: bool = True) -> None:
        """Take our rules out of ``netns``; the policy routing too unless not ``routing`` (the
        other backend's rules beside a pod with this one's: the two share it)."""
        await run_in_netns(netns, lambda: self._remove_here(routing=routing), executor=rules_executor())

    async def digest(self, netns: NetnsHandle) -> str:
        """The digest of our rules in ``netns`` now ('' if none): equal to the one an install
        returned exactly when the same rules are still in place."""
        return await run_in_netns(netns, self._digest_here, executor=rules_executor())

    # -- in a worker thread inside the pod's netns ----------------------------------------
    def _digest_here(self) -> str:
        return self._iptables_digest()

    def _iptables_digest(
        self,
        saved: dict[str, str] | None = None,
        ipv6_saved: str | None = None,
        *,
        routing: bool | None = None,
    ) -> str:
        """A digest of our chains and jumps in every family's tables (with --no-ipv6 the IPv6
        ones as far as ip6tables can tell: IPv6 chains left there are not in place, and the
        reinstall takes them out; ``ipv6_saved``: its save as it stands, read already; ``saved``:
        each tool's, read already) and of the policy routing (``routing``: whether it is there,
        known already); '' when none is there."""
        lines: list[str] = []
        for family, tool in _families(self.config.ipv6):
            lines += [f"{family} {line}" for line in our_lines(saved[tool] if saved else save(tool))]
        if not self.config.ipv6:
            ipv6 = _ipv6_save_if_any() if ipv6_saved is None else ipv6_saved
            lines += [f"6 {line}" for line in our_lines(ipv6)]
        return self._digest(lines, routing)

    def _digest(self, lines: list[str], routing: bool | None) -> str:
        """The digest of ``lines`` (our rules as the kernel lists them), the policy routing
        (``routing``: whether it is there, known already) and this configuration; '' for none."""
        if not lines:
            return ""
        present = _routing_present(self.config.ipv6) if routing is None else routing
        lines = [*lines, f"policy-routing {present}", self._config_line]
        return hashlib.sha256("\n".join(lines).encode(errors="surrogateescape")).hexdigest()[:32]

    def _install_here(self) -> tuple[list[int], str]:
        """Replace our rules, add policy routing; the families covered and the digest of what
        is now installed."""
        installed = []
        families = _families(self.config.ipv6)
        try:
            saved = {tool: save(tool) for _, tool in families}
        except UnreadableSave as exc:
            raise RulesNotOurs(f"{exc}; nothing was changed") from exc
        if foreign := [f"{tool} {rule}" for tool, text in saved.items() for rule in foreign_jumps(text)]:
            raise RulesNotOurs(  # (every family looked at before any change)
                f"the netns holds a rule zds did not make that jumps into its chains ({printable(foreign[0])}; an "
                "Istio sidecar's istio-init makes such rules, and a pod with a sidecar is never enrolled "
                "in ambient): installing would take that chain out from under it; nothing was changed"
            )
        ipv6_saved, routing = None, None
        if self._whole is not None and any(map(our_lines, saved.values())):
            # Ours there already (the uid enrolled again, another pod of this netns): as
            # Istio's reconcile (VerifyIptablesState), while every rule of ours is in place
            # nothing is replaced, only the policy routing added again. Replaced, our jumps
            # went to the end of their chains, behind a pod's own rules that had come after
            # them: traffic they had redirected was not any more.
            routing = self._add_routing()
            ipv6_saved = None if self.config.ipv6 else _ipv6_save_if_any()
            if (digest := self._iptables_digest(saved, ipv6_saved, routing=routing)) == self._whole:
                return [family for family, _ in families], digest
        for family, tool in families:
            cleanup = cleanup_rules(saved[tool])
            run_tool([f"{tool}-restore", "--noflush"], cleanup + inpod_rules(family, self.config))
            installed.append(family)
        ipv6_saved = None if self.config.ipv6 else self._take_out_ipv6_rules(ipv6_saved)
        if routing is None:  # (added already, where ours were looked at first)
            routing = self._add_routing()
        self._whole = digest = self._iptables_digest(None, ipv6_saved, routing=routing)
        return installed, digest

    def _add_routing(self) -> bool:
        """Add the policy routing; whether it is ours now (a rule of the pod's own at our pref that
        the kernel takes for ours, ``from`` or ``tos`` besides, keeps ours out: said)."""
        return _routing(add=True, ipv6=self.config.ipv6)

    def remember_whole(self, digest: str) -> None:
        """``digest``, read from a netns whose rules an earlier run installed whole, is what a whole
        install leaves (a restart: before its first install, an install there replaced them)."""
        if self._whole is None:
            self._whole = digest

    def _take_out_ipv6_rules(self, saved: str | None = None) -> str | None:
        """IPv4 only: IPv6 chains an earlier configuration installed come out, as Istio's
        reconcile takes out what it would not install; best effort, as Istio's (IPv6 off, it
        runs without a working ip6tables and skips what ip6tables-save cannot tell it). What
        ``ip6tables-save`` said (``saved``: read already), if none of ours was there (so still
        says); else None."""
        if saved is None:
            saved = _ipv6_save_if_any()
        if not cleanup_rules(saved):
            return saved
        try:
            errors = remove_family("ip6tables", saved)
        except RedirectError as exc:
            errors = [str(exc)]
        if errors:
            log.warning("IPv6 rules of an earlier configuration left in part: %s", "; ".join(errors))
        return None

    def _remove_here(self, *, routing: bool = True) -> None:
        """As Istio removes them, each step whatever the others did: per family (both, whatever
        is configured now: an earlier configuration may have installed IPv6; with --no-ipv6
        those only at best), the jumps, rules and
        chains in one restore; if that fails (a chain a rule of the pod's own still jumps to
        cannot go), the jumps out and the chains flushed, then each chain deleted on its own
        (one that cannot go stays, empty: harmless); then the policy routing (if ``routing``).
        RedirectError at the end names what could not be done."""
        errors: list[str] = []
        for _, tool in _families(self.config.ipv6 and kernel_has_ipv6()):
            try:
                try:
                    saved = save(tool)
                except UnreadableSave as exc:
                    log.warning("%s: our rules are taken out without it, as Istio's removal does", exc)
                    errors += remove_family_unread(tool)
                else:
                    errors += remove_family(tool, saved)
            except RedirectError as exc:
                errors.append(str(exc))
        if not self.config.ipv6:
            self._take_out_ipv6_rules()  # (best effort: a node agent told --no-ipv6 needs no ip6tables)
        try:
            if routing:
                _routing(add=False, ipv6=kernel_has_ipv6())
        except RedirectError as exc:
            errors.append(str(exc))
        if errors:
            raise RedirectError("; ".join(errors))


def _ipv6_save_if_any() -> str:
    """``ip6tables-save``'s output, or '' where it cannot tell (no IPv6 in the kernel, no
    working ip6tables): a node agent told --no-ipv6 needs none, as Istio's with IPv6 off."""
    if not kernel_has_ipv6():
        return ""
    try:
        return save("ip6tables")
    except RedirectError as exc:  # (an unreadable save too: nothing of it is taken out)
        log.debug("ip6tables cannot tell: %s", exc)
        return ""


#: The rule backends ``zds server --redirect-backend`` takes.
BACKENDS = ("iptables", "nftables")


#: glibc malloc arenas a node agent serving pods with the nftables backend keeps.
MALLOC_ARENAS = 2


def serving_redirector(backend: str, config: RedirectConfig) -> Redirector:
    """The redirector a node agent serves pods with (``redirector``), and what its backend asks
    of the process: with nftables, glibc's malloc kept to ``MALLOC_ARENAS`` arenas. libnftables
    runs on the rule threads (``RULE_WORKERS``), each malloc-ing in an arena of its own: a node
    agent enrolling and removing pods without end held ~95-155 MB resident where the iptables
    backend's stays at ~70; with two arenas, ~86-97 (bench/results/soak.md)."""
    rules = redirector(backend, config)
    if backend == "nftables":
        limits.limit_malloc_arenas(MALLOC_ARENAS)
    return rules


def redirector(backend: str, config: RedirectConfig = RedirectConfig()) -> Redirector:
    """The redirector of ``backend`` (one of ``BACKENDS``).

    The policy routing's netlink code (pyroute2, ~5 MB and ~30 ms to load) is loaded here,
    with the rules on, not in a rule thread at the first pod; a node agent that installs no
    rules (``--no-redirect``) never loads it."""
    import zds.server.policyrouting  # noqa: F401

    if backend == "nftables":
        from zds.server.nftables import NftablesRedirector

        return NftablesRedirector(config)
    if backend != "iptables":
        raise ValueError(f"unknown redirect backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return Redirector(config)


def node_config(backend: str, config: RedirectConfig) -> RedirectConfig:
    """``config`` as this node can have it, checked once at start-up: IPv4 only on a kernel
    without IPv6 (said: ip6tables and IPv6 netlink would fail every pod there); RedirectError
    where the iptables backend is to install IPv6 rules and ``ip6tables-save`` does not work
    (as Istio's agent, which does not start without a working ip6tables while IPv6 is on: a
    pod would get its IPv4 rules taken out again by the failure of its IPv6 ones)."""
    if not config.ipv6:
        return config
    if not kernel_has_ipv6():
        log.info("this kernel has no IPv6: the in-pod rules and policy routing are IPv4 only")
        return dataclasses.replace(config, ipv6=False)
    if backend == "iptables":
        try:
            run_tool(["ip6tables-save"])
        except RedirectError as exc:
            raise RedirectError(
                f"{exc}; the pods' IPv6 rules need a working ip6tables (or give --no-ipv6)"
            ) from None
    return config


@functools.cache
def kernel_has_ipv6() -> bool:
    """Whether this kernel has IPv6 at all (not booted with ``ipv6.disable=1``)."""
    return os.path.exists("/proc/net/if_inet6")
