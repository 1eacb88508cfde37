"""Rules left in a pod's netns that nothing could take out at the time: a failed install whose
undo failed too, or a removal whose rules would not come out. They redirect the pod's
traffic to listeners nobody opens, so taking them out is tried again in the background,
the pause growing (``UNDO_RETRY_INITIAL`` .. ``UNDO_RETRY_MAX``), one task a netns.

The pod store records them while they are in (its ``leftovers`` table, one row per uid, netns
and rule set: a re-add of the uid elsewhere leaves it alone), so a stop before they are out
leaves them to the next start (``recovery``), which takes them out or hands them back here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping

from zds import defaults
from zds.netns import NetnsIdentity, netns_identity_of_path
from zds.netns.search import find_by_identity
from zds.server.podcache import PodCache
from zds.server.podrules import PodRules, remove_rules_of
from zds.server.pods import Pod
from zds.server.redirect import RedirectConfig
from zds.server.store import PodStore, StoredPod
from zds.server.storefile import StoreError
from zds.server.tasks import TaskOwner

log = logging.getLogger("zds.server")


@dataclasses.dataclass
class _Left:
    """What is left in one netns: (uid, rule set) -> the kinds of the rows that record it
    (True: a removal's; False: an install's)."""

    rows: dict[tuple[str, str], set[bool]]
    #: The rule sets taken out already.
    out: set[str] = dataclasses.field(default_factory=set)

    def what(self) -> str:
        kinds = set().union(*self.rows.values())
        if kinds == {True}:
            return "rules a failed removal left"
        if kinds == {False}:
            return "rules a failed install left"
        return "rules failed installs and removals left"


class Leftovers:
    """The netns whose leftover rules are being tried again, and what each holds."""

    def __init__(
        self,
        rules: PodRules | None,
        cache: PodCache,
        store: PodStore | None,
        tasks: TaskOwner,
        *,
        under_way: Callable[[str], bool],
    ) -> None:
        #: This node agent's rules (None with --no-redirect: only an earlier run's are left).
        self.rules = rules
        self.cache = cache
        self.store = store
        self.tasks = tasks
        #: An enrollment or removal of the uid is under way.
        self._under_way = under_way
        self._netns: dict[NetnsIdentity, _Left] = {}

    def __contains__(self, identity: object) -> bool:
        return identity in self._netns

    def retry(self, pod: Pod, *, removal: bool, backend: str = "", recorded: bool = False) -> None:
        """Try again to take out the rules ``pod`` left (``removal``: its removal's; else a
        failed install's), installed by ``backend`` (default: this node agent's rule set).
        Their row moves to the store's ``leftovers`` unless ``recorded`` there already. Takes
        ``pod``'s netns fd: one task a netns holds one (a second pod there joins the first's
        task, and its fd goes now)."""
        assert pod.netns is not None
        if not backend:
            assert self.rules is not None
            backend = self.rules.name
        if not recorded:
            self._record(pod, removal, backend)
        left = self._netns.get(pod.netns.identity)
        if left is not None:
            left.rows.setdefault((pod.uid, backend), set()).add(removal)
            left.out.discard(backend)
            pod.close()
            return
        self._netns[pod.netns.identity] = _Left({(pod.uid, backend): {removal}})
        self.tasks.spawn(self._retry(pod), name=f"undo-{pod.uid}")

    def take_if_left(self, pod: Pod, *, removal: bool, backend: str = "") -> bool:
        """If taking the pod's rules out failed (they are still in), hand the pod, its netns
        fd with it, to ``retry``: True."""
        if not pod.rules_installed or pod.netns is None:
            return False
        self.retry(pod, removal=removal, backend=backend)
        return True

    def _record(self, pod: Pod, removal: bool, backend: str) -> None:
        """Move the row that records the rules (a removal's pod row, an install row) to
        ``leftovers``. If that fails it stays where it is (logged), and goes once they are out."""
        if self.store is None:
            return
        try:
            self.store.keep_leftover(dataclasses.replace(StoredPod.of(pod, rules=backend), removing=removal))
        except StoreError as exc:
            log.error(
                "cannot record the rules left in the pod store: %s (tried again all the same; the "
                "next start knows of them only from the row that recorded them so far, if any)",
                exc,
                extra=pod.spec.log_extra,
            )

    async def _retry(self, pod: Pod) -> None:
        """Until the rules are out (their rows go: in ``leftovers``, and where moving them
        there failed, a removal's pod row or an install row for this netns, unless the uid was
        enrolled again or is being enrolled or removed right now), nothing but this fd holds
        the netns any more (neither its path nor any process or named netns: the kernel takes
        the rules out with it once this fd lets it go; the rows go), a pod of this node agent's
        is cached in that netns (they are its rules now, its own row records them; the rows
        go), or the node agent stops (the rows stay: the next start takes them out). A pod
        being enrolled there, not cached yet, defers the try."""
        assert pod.netns is not None
        identity = pod.netns.identity
        left = self._netns[identity]
        pause = defaults.UNDO_RETRY_INITIAL
        try:
            while True:
                await asyncio.sleep(pause)
                pause = min(pause * 2, defaults.UNDO_RETRY_MAX)
                what = left.what()
                if _gone(pod):
                    log.info(
                        "%s go with their netns: it is no longer at %s nor anywhere else",
                        what,
                        pod.spec.netns,
                        extra=pod.spec.log_extra,
                    )
                    break
                if self.rules is not None and self.cache.uses_netns(identity):
                    log.info(
                        "%s are kept: another pod lives in its netns now", what, extra=pod.spec.log_extra
                    )
                    break
                if await self._take_out(pod, left):
                    log.info("%s are taken out now", what, extra=pod.spec.log_extra)
                    break
            self._forget(identity, left)
        finally:
            del self._netns[identity]
            pod.close()

    async def _take_out(self, pod: Pod, left: _Left) -> bool:
        """Try each rule set left there once (one already out is not tried again): True once
        all are out."""
        for backend in sorted({backend for _, backend in left.rows} - left.out):
            if self.rules is not None:
                out = await self.rules.undo_again(pod, self.cache.in_use, backend)
            else:
                out = await remove_rules_of(
                    pod, backend, RedirectConfig(), "this node agent installs none (--no-redirect)"
                )
            if not out:
                return False
            left.out.add(backend)
        return True

    def _forget(self, identity: NetnsIdentity, left: _Left) -> None:
        """The rules are out: their rows go. A failure is logged (the next start takes out
        rules that are already out)."""
        if self.store is None:
            return
        uids = sorted({uid for uid, _ in left.rows})
        # (a uid enrolled again, or being enrolled or removed: its pod and install rows are its own now)
        rows_of = [uid for uid in uids if not self._under_way(uid) and uid not in self.cache]
        try:
            self.store.forget_leftovers(identity, uids, rows_of=rows_of)
        except StoreError as exc:
            log.warning("cannot update the pod store: %s", exc, extra={"uid": uids[0]})


def _gone(pod: Pod) -> bool:
    """Nothing but the retry's fd holds the pod's netns: neither the place it was enrolled
    from (a path, ``/proc/PID/ns/net``) nor any process or named netns (a pod recovered from
    elsewhere, a pid that is gone while the pod's other processes live on)."""
    assert pod.netns is not None
    identity = pod.netns.identity
    if netns_identity_of_path(pod.spec.netns.location) == identity:
        return False
    return identity not in find_by_identity({identity})


def forget_install_row(
    store: PodStore | None, uid: str, *, log_extra: Mapping[str, object] | None = None
) -> None:
    """Take out the install row of ``uid``. A failure is logged: the next start takes out
    rules that are already out."""
    if store is None:
        return
    try:
        store.forget_install(uid)
    except StoreError as exc:
        log.warning("cannot update the pod store: %s", exc, extra=log_extra or {"uid": uid})


def delete_pod_row(store: PodStore | None, uid: str) -> None:
    """A removal is done: the pod's row goes. A failure is logged: the row stays marked
    removing, and the next start finishes the removal (Istio's rule: a delete is done
    whatever happens)."""
    if store is None:
        return
    try:
        store.delete(uid)
    except StoreError as exc:
        log.error("cannot record the removal in the pod store: %s", exc, extra={"uid": uid})
