"""Rules left in a pod's netns that nothing could take out at the time: a failed install whose
undo failed too, or a removal whose rules would not come out. They redirect the pod's
traffic to listeners nobody opens, so taking them out is tried again in the background,
the pause growing (``UNDO_RETRY_INITIAL`` .. ``UNDO_RETRY_MAX``), one task a netns.

The rows that record them stay in the pod store while they are in (an install row, or a
pod row marked removing): a stop before they are out leaves them to the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from zds import defaults
from zds.netns import NetnsIdentity, netns_identity_of_path
from zds.netns.search import find_by_identity
from zds.server.podcache import PodCache
from zds.server.podrules import PodRules
from zds.server.pods import Pod
from zds.server.store import PodStore
from zds.server.storefile import StoreError
from zds.server.tasks import TaskOwner

log = logging.getLogger("zds.server")


class Leftovers:
    """The netns whose leftover rules are being tried again, and the uids whose rows record
    them there (each with its rows' kinds: True, a pod row marked removing; False, an install
    row)."""

    def __init__(
        self,
        rules: PodRules,
        cache: PodCache,
        store: PodStore | None,
        tasks: TaskOwner,
        *,
        under_way: Callable[[str], bool],
    ) -> None:
        self.rules = rules
        self.cache = cache
        self.store = store
        self.tasks = tasks
        #: An enrollment or removal of the uid is under way.
        self._under_way = under_way
        self._netns: dict[NetnsIdentity, dict[str, set[bool]]] = {}

    def __contains__(self, identity: object) -> bool:
        return identity in self._netns

    def retry(self, pod: Pod, *, removal: bool) -> None:
        """Try again to take out the rules ``pod`` left (``removal``: its removal's; else a
        failed install's). Takes ``pod``'s netns fd: one task a netns holds one (a second pod
        there joins the first's task, and its fd goes now)."""
        assert pod.netns is not None
        uids = self._netns.get(pod.netns.identity)
        if uids is not None:
            uids.setdefault(pod.uid, set()).add(removal)
            pod.close()
            return
        self._netns[pod.netns.identity] = {pod.uid: {removal}}
        self.tasks.spawn(self._retry(pod), name=f"undo-{pod.uid}")

    def take_if_left(self, pod: Pod, *, removal: bool) -> bool:
        """If taking the pod's rules out failed (they are still in), hand the pod, its netns
        fd with it, to ``retry``: True."""
        if not pod.rules_installed or pod.netns is None:
            return False
        self.retry(pod, removal=removal)
        return True

    async def _retry(self, pod: Pod) -> None:
        """Until the rules are out (the rows that record them go: install rows for this netns,
        pod rows marked removing; not one of a uid enrolled again or being enrolled or removed
        right now), nothing but this fd holds the netns any more (neither its path nor any
        process or named netns: the kernel takes the rules out with it once this fd lets it go;
        the rows go), a pod is cached in that netns (they are its rules
        now; the rows stay for the next start, which keeps them), or the node agent stops (the
        rows stay: the next start takes them out). A pod being enrolled there, not cached yet,
        defers the try."""
        assert pod.netns is not None
        identity = pod.netns.identity
        pause = defaults.UNDO_RETRY_INITIAL
        try:
            while True:
                await asyncio.sleep(pause)
                pause = min(pause * 2, defaults.UNDO_RETRY_MAX)
                what = _what(self._netns[identity])
                if _gone(pod):
                    log.info(
                        "%s go with their netns: it is no longer at %s nor anywhere else",
                        what,
                        pod.spec.netns,
                        extra=pod.spec.log_extra,
                    )
                    break
                if self.cache.uses_netns(identity):
                    log.info(
                        "%s are kept: another pod lives in its netns now", what, extra=pod.spec.log_extra
                    )
                    return
                if await self.rules.undo_again(pod, self.cache.in_use):
                    log.info("%s are taken out now", what, extra=pod.spec.log_extra)
                    break
            for uid, kinds in sorted(self._netns[identity].items()):
                if self._under_way(uid) or uid in self.cache:  # (its rows are its own now)
                    continue
                if True in kinds:
                    delete_pod_row(self.store, uid, identity)
                if False in kinds:
                    forget_install_row(self.store, uid, identity)
        finally:
            del self._netns[identity]
            pod.close()


def _gone(pod: Pod) -> bool:
    """Nothing but the retry's fd holds the pod's netns: neither the place it was enrolled
    from (a path, ``/proc/PID/ns/net``) nor any process or named netns (a pod recovered from
    elsewhere, a pid that is gone while the pod's other processes live on)."""
    assert pod.netns is not None
    identity = pod.netns.identity
    if netns_identity_of_path(pod.spec.netns.location) == identity:
        return False
    return identity not in find_by_identity({identity})


def _what(uids: dict[str, set[bool]]) -> str:
    kinds = set().union(*uids.values())
    if kinds == {True}:
        return "rules a failed removal left"
    if kinds == {False}:
        return "rules a failed install left"
    return "rules failed installs and removals left"


def forget_install_row(
    store: PodStore | None,
    uid: str,
    identity: NetnsIdentity | None = None,
    *,
    log_extra: Mapping[str, object] | None = None,
) -> None:
    """Take out the install row of ``uid`` (with ``identity``: only its row for that netns). A
    failure is logged: the next start takes out rules that are already out."""
    if store is None:
        return
    try:
        store.forget_install(uid, identity)
    except StoreError as exc:
        log.warning("cannot update the pod store: %s", exc, extra=log_extra or {"uid": uid})


def delete_pod_row(store: PodStore | None, uid: str, identity: NetnsIdentity | None = None) -> None:
    """A removal is done: the pod's row goes (with ``identity``: only the removal's row for
    that netns). A failure is logged: the row stays marked removing, and the next start
    finishes the removal (Istio's rule: a delete is done whatever happens)."""
    if store is None:
        return
    try:
        store.delete(uid, identity)
    except StoreError as exc:
        log.error("cannot record the removal in the pod store: %s", exc, extra={"uid": uid})
