"""The in-pod redirection rules of enrolled pods: installed before a pod is cached,
removed before ztunnel lets go of it (Istio's ``net_linux.go`` order).

One lock per network namespace, so an install and a removal there never
interleave; a removal leaves the rules in place while another cached pod still
lives in that namespace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from opentelemetry import trace

from zds.errors import ZdsError
from zds.netns import NetnsError, NetnsIdentity
from zds.server import spans
from zds.server.inpodrules import RedirectConfig
from zds.server.locks import KeyedLocks
from zds.server.podcache import Pod, PodCache
from zds.server.redirect import NothingChanged, RedirectError, Redirector, RulesNotOurs, redirector

log = logging.getLogger("zds.server")


class RulesError(ZdsError):
    """The rules could not be installed; the message says why (iptables' own words).
    ``undone``: what went in came out again (or another pod's rules stay there)."""

    def __init__(self, message: str, *, undone: bool = True, refused: bool = False) -> None:
        super().__init__(message)
        self.undone = undone
        #: Refused before anything was touched (rules there that are not ours).
        self.refused = refused


class PodRules:
    """Installs and removes the rules of cached pods through a ``Redirector``."""

    def __init__(self, redirector: Redirector, tracer: trace.Tracer) -> None:
        self.redirector = redirector
        self._tracer = tracer
        self._locks: KeyedLocks[NetnsIdentity] = KeyedLocks()

    async def install(
        self,
        pod: Pod,
        still_used: Callable[[NetnsIdentity], bool] = lambda _: False,
        *,
        recorded: bool = False,
    ) -> None:
        """Install the rules in the pod's netns; RulesError (with iptables' words) on failure,
        after taking out whatever went in (an IPv4 set before a failed IPv6 one), unless
        ``still_used``: another cached pod lives in that netns and keeps its rules. A failed
        transaction that changed nothing (nftables) takes nothing out, unless ``recorded``:
        the pod store says this rule set is in that netns already (a restart's reinstall)."""
        if pod.netns is None:
            return
        pod.rules_backend = self.name  # (also what a failed install leaves is of this rule set)
        with spans.span(self._tracer, spans.INSTALL_RULES, {spans.POD_UID: pod.uid}) as span:
            async with self._locks.hold(pod.netns.identity):
                try:
                    installed = await self.redirector.install(pod.netns)
                except asyncio.CancelledError:
                    # Stopping: the install's worker never ran or has finished (run_in_netns),
                    # and what it may have put in comes out, as after a failed install (rules
                    # no pod store row records stayed in the namespace for good). A second
                    # cancel stops waiting for that.
                    if not still_used(pod.netns.identity):
                        await asyncio.shield(self._undo(pod))
                    raise
                except RulesNotOurs as exc:  # (nothing went in: nothing to take out)
                    spans.failed(span, exc)
                    raise RulesError(f"pod {pod.uid} not enrolled: {exc}", refused=True) from exc
                except (RedirectError, NetnsError, OSError) as exc:
                    spans.failed(span, exc)
                    # (tables with our names and someone else's chains, for one: they stay)
                    kept = isinstance(exc, NothingChanged) and not recorded
                    undone = kept or still_used(pod.netns.identity) or await self._undo(pod)
                    left = "" if undone else "; what went in could not be taken out"
                    raise RulesError(
                        f"cannot install in-pod redirection rules for pod {pod.uid}: {exc}{left}",
                        undone=undone,
                    ) from exc
        pod.rules_installed = True
        pod.rules_digest = installed.digest
        log.info(
            "in-pod redirection rules installed (IPv%s)",
            "+IPv".join(map(str, installed.families)),
            extra=pod.spec.log_extra,
        )

    async def _undo(self, pod: Pod) -> bool:
        """A failed install leaves the namespace as it was: take out what may have gone in.
        False (logged) if that failed too: the pod's install row must then stay."""
        assert pod.netns is not None
        try:
            await self.redirector.remove(pod.netns)
        except (RedirectError, NetnsError, OSError) as exc:
            log.error("cannot take out a partly installed rule set: %s", exc, extra=pod.spec.log_extra)
            return False
        return True

    async def undo_again(self, pod: Pod, cache: PodCache, backend: str) -> bool:
        """Try again to take out the rules ``backend`` (as the pod store records it) left in the
        pod's netns (a failed install's, a removal's): True once out; False if that failed
        again (logged) or a pod lives, or is being enrolled, in that netns (``cache``): not now
        (for the other backend's rules: ``remove_other``)."""
        assert pod.netns is not None
        if backend != self.name:
            return await self.remove_other(pod, backend, cache, quiet=True)
        async with self._locks.hold(pod.netns.identity):
            if cache.in_use(pod.netns.identity):
                return False
            return await self._undo(pod)

    async def in_place(self, pod: Pod) -> bool:
        """Whether the rules in the pod's netns are still the ones ``pod.rules_digest`` recorded."""
        if pod.netns is None or not pod.rules_digest:
            return False
        try:
            async with self._locks.hold(pod.netns.identity):
                if same := await self.redirector.digest(pod.netns) == pod.rules_digest:
                    self.redirector.remember_whole(pod.rules_digest)
                return same
        except (RedirectError, NetnsError, OSError) as exc:
            log.warning("cannot read the in-pod rules: %s", exc, extra=pod.spec.log_extra)
            return False

    @property
    def name(self) -> str:
        """The rule set, as the pod store records it."""
        return self.redirector.name

    def must_wait(self, cache: PodCache, identity: NetnsIdentity, backend: str) -> bool:
        """Whether the rules ``backend`` left in the netns ``identity`` must stay while the pods
        there live: this rule set's (they are theirs, or share their chains), or the other's
        beside a pod recovered without opening that netns, or being enrolled there (they may be
        its rules). The other's beside pods with this one's only need not: they come out, the
        policy routing the two share staying (``remove_other``)."""
        return cache.in_use(identity) and (backend == self.name or not cache.only_ours_in(identity))

    async def remove_other(
        self, pod: Pod, backend: str, cache: PodCache | None = None, *, quiet: bool = False
    ) -> bool:
        """Take out the rules another backend (``backend``, as the pod store recorded it)
        installed in the pod's netns (a node agent restarted with the other
        ``--redirect-backend``). Beside pods with this backend's rules there (``cache``) the
        policy routing the two rule sets share stays, and only theirs go: a pod kept both
        rule sets for as long as it lived. False, logged, if that failed, or (not tried)
        while a pod recovered without opening that netns, or being enrolled, lives there
        (its rules may be these; ``quiet``: not said, a retry asks again)."""
        if pod.netns is None:
            return True
        identity = pod.netns.identity
        async with self._locks.hold(identity):
            beside = cache is not None and cache.in_use(identity)
            if cache is not None and self.must_wait(cache, identity, backend):
                if not quiet:
                    log.info(
                        "the %s rules stay while a pod recovered without opening this netns, or being "
                        "enrolled, lives there (they may be its rules)",
                        backend,
                        extra=pod.spec.log_extra,
                    )
                return False
            return await remove_rules_of(
                pod, backend, self.redirector.config, f"this node agent uses {self.name}", routing=not beside
            )

    async def remove(self, pod: Pod, still_used: Callable[[NetnsIdentity], bool]) -> None:
        """Take the pod's rules out, unless ``still_used(identity)``: another cached pod
        (re-added, or another uid) lives in the same netns and keeps them. Failures are logged."""
        if pod.netns is None or not pod.rules_installed:
            return
        identity = pod.netns.identity
        with spans.span(self._tracer, spans.REMOVE_RULES, {spans.POD_UID: pod.uid}) as span:
            try:
                async with self._locks.hold(identity):
                    if still_used(identity):
                        log.info("rules kept: another enrolled pod uses this netns", extra=pod.spec.log_extra)
                    else:
                        await self.redirector.remove(pod.netns)
                pod.rules_installed = False
            except (RedirectError, NetnsError, OSError) as exc:
                spans.failed(span, exc)
                log.warning("cannot remove in-pod redirection rules: %s", exc, extra=pod.spec.log_extra)


async def remove_earlier_rules(pod: Pod, backend: str, config: RedirectConfig) -> bool:
    """Take out the ``backend`` rules an earlier run installed, this node agent installing
    none (--no-redirect), as ``config`` (its flags) says: told --no-ipv6, their IPv6 side at
    best (as its own would be), needing no working ip6tables. False, logged, if that failed."""
    return await remove_rules_of(pod, backend, config, "this node agent installs none (--no-redirect)")


async def remove_rules_of(
    pod: Pod, backend: str, config: RedirectConfig, why: str, *, routing: bool = True
) -> bool:
    """Take out of the pod's netns the rules ``backend`` (as the pod store recorded it)
    installed, ``why`` this node agent does not keep them (said in the log line); the policy
    routing too unless not ``routing``. False, logged, if that failed."""
    assert pod.netns is not None
    try:
        await redirector(backend, config).remove(pod.netns, routing=routing)
    except (RedirectError, NetnsError, OSError, ValueError) as exc:
        log.warning("cannot remove the %s rules: %s", backend, exc, extra=pod.spec.log_extra)
        return False
    log.info("%s rules removed: %s", backend, why, extra=pod.spec.log_extra)
    return True
