"""The node agent's pod cache (Istio's ``pod_cache.go``): every known pod and its
open netns, and which netns pods being enrolled (not cached yet) claim.

It owns each cached pod's netns fd: a pod replaced or removed is handed back to
the caller, which closes it (after taking its rules out where needed).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zds.netns import NetnsIdentity
from zds.server.pods import PodSpec, PodState

if TYPE_CHECKING:
    from zds.netns import NetnsHandle


@dataclass(frozen=True)
class Unopened:
    """The netns a pod was enrolled in, as stored, for a pod recovered without opening it (at
    a place this run does not allow, or no fd to look for it): it may live on, with the
    pod's rules in it."""

    identity: NetnsIdentity
    cookie: int | None


@dataclass
class Pod:
    """A cache entry: the spec, the open netns (None when it could not be opened) and delivery state."""

    spec: PodSpec
    netns: NetnsHandle | None
    state: PodState = PodState.PENDING
    last_error: str = ""
    enrolled_at: float = field(default_factory=time.time)
    rules_installed: bool = False
    #: The rule set that installed them (the redirect backend's name), while ``rules_installed``.
    rules_backend: str = ""
    #: What the installed rules looked like (the redirect backend's digest), for the store.
    rules_digest: str = ""
    #: How this pod came back after a node-agent restart ('' for a pod enrolled by this run).
    recovery: str = ""
    #: Recovered without opening its netns, which may live on: which netns that is (its row,
    #: rewritten, or its rules recorded as left when it is replaced, still say so).
    unopened: Unopened | None = None

    @property
    def uid(self) -> str:
        return self.spec.uid

    def close(self) -> None:
        """Close the netns fd now (not whenever a garbage collector gets to it)."""
        if self.netns is not None:
            self.netns.close()


class PodCache:
    """uid -> Pod, plus the specs of pods being removed (their DelWorkload acks
    are still logged with the pod's name)."""

    def __init__(self) -> None:
        self._pods: dict[str, Pod] = {}
        self._removing: dict[str, PodSpec] = {}
        #: How many cached pods whose netns is open have their rules in each netns (asked on
        #: every removal: no scan), and where each pod with rules was counted (its rules do not
        #: change while it is cached; True: in ``_unopened_in``).
        self._rules_in: collections.Counter[NetnsIdentity] = collections.Counter()
        self._counted: dict[str, tuple[NetnsIdentity, bool]] = {}
        #: How many pods recovered without opening their netns may have their rules in each
        #: (of either rule set): they count only for ``in_use``.
        self._unopened_in: collections.Counter[NetnsIdentity] = collections.Counter()
        #: Pods being enrolled (not cached yet), by netns: those whose rules went in count.
        self._claims: dict[NetnsIdentity, list[Pod]] = {}

    def get(self, uid: str) -> Pod | None:
        return self._pods.get(uid)

    def __contains__(self, uid: object) -> bool:
        return uid in self._pods

    def __len__(self) -> int:
        return len(self._pods)

    def __iter__(self) -> Iterator[Pod]:
        return iter(list(self._pods.values()))  # a copy: a metrics thread may read while the loop writes

    def uids(self) -> list[str]:
        return list(self._pods)

    def put(self, pod: Pod) -> Pod | None:
        """Cache ``pod``; returns the pod it replaced (same uid), if any, for the caller to release."""
        old = self._pods.get(pod.uid)
        if old is pod:
            return None
        self._pods[pod.uid] = pod
        self._uncount(pod.uid)
        if pod.rules_installed and pod.netns is not None:
            self._counted[pod.uid] = pod.netns.identity, False
            self._rules_in[pod.netns.identity] += 1
        elif pod.rules_installed and pod.unopened is not None:
            self._counted[pod.uid] = pod.unopened.identity, True
            self._unopened_in[pod.unopened.identity] += 1
        return old

    def _uncount(self, uid: str) -> None:
        counted = self._counted.pop(uid, None)
        if counted is not None:
            identity, unopened = counted
            counter = self._unopened_in if unopened else self._rules_in
            counter[identity] -= 1
            if counter[identity] <= 0:
                del counter[identity]

    def pop(self, uid: str) -> Pod:
        """Forget a pod (KeyError if unknown); its spec stays findable until ``removed``."""
        pod = self._pods.pop(uid)
        self._uncount(uid)
        self._removing[uid] = pod.spec
        return pod

    def removed(self, uid: str) -> None:
        """The removal of ``uid`` is over."""
        self._removing.pop(uid, None)

    def spec(self, uid: str, *, removing: bool = False) -> PodSpec | None:
        """A known pod's spec; with ``removing``, also one whose removal is under way."""
        if removing and uid in self._removing:
            return self._removing[uid]
        pod = self._pods.get(uid)
        return pod.spec if pod is not None else None

    def has_rules_in(self, identity: NetnsIdentity) -> bool:
        """Some cached pod whose netns is open has its rules in this network namespace (a pod
        without them, one whose rules failed at a start, does not count: the rules there are
        nobody's; with rules on, a counted pod's rules are this node agent's rule set)."""
        return identity in self._rules_in

    @contextlib.contextmanager
    def claim(self, pod: Pod) -> Iterator[None]:
        """Meanwhile ``pod``, being enrolled and not cached yet, counts as living in its netns
        once its rules are in (``in_use``): a removal of another pod there keeps them. Not
        before: a removal that kept the rules for it left them to a pod that could still be
        refused without touching them (rules not ours), and then they were nobody's."""
        identity = pod.netns.identity if pod.netns is not None else None
        if identity is None:
            yield
            return
        self._claims.setdefault(identity, []).append(pod)
        try:
            yield
        finally:
            claimants = self._claims[identity]
            del claimants[next(i for i, p in enumerate(claimants) if p is pod)]  # (this one, not an equal)
            if not claimants:
                del self._claims[identity]

    def only_ours_in(self, identity: NetnsIdentity) -> bool:
        """Pods with rules live in this netns, and every one of them is cached with its netns
        open (so with this node agent's rule set): none recovered without opening it, none
        being enrolled there. Another rule set's rules there are nobody's then."""
        return (
            identity in self._rules_in and identity not in self._unopened_in and identity not in self._claims
        )

    def in_use(self, identity: NetnsIdentity, *, besides: Pod | None = None) -> bool:
        """A cached pod has (or, recovered without opening its netns, may have) its rules in
        this netns, or a pod being enrolled there other than ``besides`` installed them."""
        return (
            identity in self._rules_in
            or identity in self._unopened_in
            or any(p.rules_installed and p is not besides for p in self._claims.get(identity, ()))
        )

    def by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for pod in self:
            counts[pod.state.value] = counts.get(pod.state.value, 0) + 1
        return counts

    def listing(self) -> list[Pod]:
        """Every pod, by namespace, name and uid."""
        return sorted(self, key=lambda p: (p.spec.namespace, p.spec.name, p.uid))

    def close(self) -> None:
        """Close every netns fd and forget every pod (shutdown)."""
        for pod in self:
            pod.close()
        self._pods.clear()
        self._rules_in.clear()
        self._unopened_in.clear()
        self._counted.clear()
