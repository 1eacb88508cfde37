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
from zds.netns import NetnsHandle, NetnsIdentity, OutOfFds, netns_identity_of_path
from zds.netns.search import find_by_identity
from zds.server.inpodrules import RedirectConfig
from zds.server.netnspolicy import NetnsPolicy, named_dirs
from zds.server.podcache import Pod, PodCache
from zds.server.podrules import PodRules, remove_earlier_rules
from zds.server.store import PodStore
from zds.server.storefile import StoreError
from zds.server.storerows import StoredPod
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
        policy: NetnsPolicy | None = None,
        earlier: RedirectConfig | None = None,
    ) -> None:
        #: This node agent's rules (None with --no-redirect: only an earlier run's are left).
        self.rules = rules
        #: With --no-redirect, the configuration an earlier run's rules are taken out with: the
        #: node agent's own (told --no-ipv6, their IPv6 side at best, needing no ip6tables).
        self._earlier = earlier or RedirectConfig()
        self.cache = cache
        self.store = store
        self.tasks = tasks
        #: An enrollment or removal of the uid is under way.
        self._under_way = under_way
        #: Where named namespaces may be (the allowed roots): looked at before a netns is taken for gone.
        self._named_dirs = named_dirs(policy)
        self._netns: dict[NetnsIdentity, _Left] = {}

    def __contains__(self, identity: object) -> bool:
        return identity in self._netns

    async def remove_earlier(self, pod: Pod, backend: str) -> bool:
        """With --no-redirect: take out the ``backend`` rules an earlier run installed in the
        pod's netns (``remove_earlier_rules``, with this node agent's configuration)."""
        return await remove_earlier_rules(pod, backend, self._earlier)

    def retry(self, pod: Pod, *, removal: bool, recorded: bool = False) -> None:
        """Try again to take out the rules ``pod`` left (``removal``: its removal's; else a
        failed install's), of the rule set ``pod.rules_backend``. Their row moves to the
        store's ``leftovers`` unless ``recorded`` there already. Takes ``pod``'s netns fd: one
        task a netns holds one (a second pod there joins the first's task, and its fd goes
        now)."""
        assert pod.netns is not None and pod.rules_backend
        identity, key = pod.netns.identity, (pod.uid, pod.rules_backend)
        if not recorded:
            self._record(pod, removal)
        left = self._netns.get(identity)
        if left is not None:
            left.rows.setdefault(key, set()).add(removal)
            left.out.discard(pod.rules_backend)
            pod.close()
            return
        self._netns[identity] = left = _Left({key: {removal}})
        task = self.tasks.spawn(self._retry(pod, left), name=f"undo-{pod.uid}")
        # (for a task cancelled before it ever ran, a stop right after this: its finally never runs)
        task.add_done_callback(lambda _: self._ended(identity, pod, left))

    def take_if_left(self, pod: Pod, *, removal: bool, recorded: bool = False) -> bool:
        """If taking the pod's rules out failed (they are still in), hand the pod, its netns
        fd with it, to ``retry``: True."""
        if not pod.rules_installed or pod.netns is None:
            return False
        self.retry(pod, removal=removal, recorded=recorded)
        return True

    def forget_row(self, pod: Pod, backend: str) -> None:
        """The rules of ``backend`` recorded as left in the pod's netns are out: their row goes
        (a failure is logged: the next start takes out rules that are already out)."""
        if self.store is None or pod.netns is None:
            return
        try:
            self.store.forget_leftovers(pod.netns.identity, [(pod.uid, backend)])
        except StoreError as exc:
            log.warning("cannot update the pod store: %s", exc, extra=pod.spec.log_extra)

    def left_by_replacing(self, old: Pod, new: Pod) -> StoredPod | None:
        """The record of the rules ``old`` leaves in its netns once ``new`` (the same uid)
        replaces it (``replaced``), for the store's ``leftovers`` in the very transaction that
        commits ``new``'s row over ``old``'s; None if it leaves none."""
        if not _left_by(old, new):
            return None
        return StoredPod.of(old, rules=old.rules_backend, removing=True)

    def replaced(self, old: Pod, new: Pod) -> None:
        """``old`` was replaced in the cache by ``new`` (the same uid), and the rules it leaves
        recorded (``left_by_replacing``): its netns fd goes, and with it, if ``new`` lives
        elsewhere, its rules (for an ``old`` recovered without opening its netns: they stay,
        recorded); in the same netns, the rules of the rule set ``new`` does not install
        (an earlier run's that would not come out, or those ``old`` was recovered with without
        opening its netns) go to the retry."""
        where = _left_by(old, new)
        if where == "elsewhere" and old.netns is not None:
            self.tasks.spawn(self._take_out_replaced(old))
        elif where == "elsewhere":  # (recovered without opening it: a start that can takes them out)
            log.warning(
                "the pod's rules in the netns it was recovered from without opening it stay there, "
                "recorded for a start that can open it",
                extra=old.spec.log_extra,
            )
        elif where and old.netns is not None:
            self.retry(old, removal=True, recorded=True)
        elif where:  # (its netns, open now through ``new``)
            self.retry_beside(new, old.rules_backend, removal=True, recorded=True)
        else:
            old.close()  # (queued sends hold their own dups)

    async def _take_out_replaced(self, old: Pod) -> None:
        """Take the rules of a pod replaced by one elsewhere out of its old netns (unless a pod
        with rules lives there: they are its rules); tried again if they stay in."""
        try:
            if self.rules is not None:
                await self.rules.remove(old, self.cache.in_use)
        except BaseException:
            old.close()  # (stopping: its rules stay recorded, for the next start)
            raise
        if not self.take_if_left(old, removal=True, recorded=True):
            self.forget_row(old, old.rules_backend)
            old.close()

    def retry_beside(self, pod: Pod, backend: str, *, removal: bool = False, recorded: bool = False) -> None:
        """``retry`` for rules of ``backend`` left in the netns of a pod that stays cached (at a
        start: a failed reinstall's, or the other backend's that would not come out), with a
        netns fd of its own (the other backend's wait while a pod with rules lives there). If
        no fd is left for it, they are only recorded (the next start takes them out)."""
        assert pod.netns is not None
        try:
            netns = NetnsHandle(pod.netns.dup(), pod.netns.path, pod.netns.identity)
        except OSError as exc:
            log.warning("cannot hold the pod's netns to try again: %s", exc, extra=pod.spec.log_extra)
            if not recorded:
                self.keep_row(StoredPod.of(pod, rules=backend, removing=removal))
            return
        netns.move_above(defaults.NETNS_FD_FLOOR)
        self.retry(
            Pod(spec=pod.spec, netns=netns, rules_installed=True, rules_backend=backend),
            removal=removal,
            recorded=recorded,
        )

    def _record(self, pod: Pod, removal: bool) -> None:
        self.keep_row(StoredPod.of(pod, rules=pod.rules_backend, removing=removal))

    def keep_row(self, row: StoredPod) -> None:
        """Record the rules ``row`` records in the store's ``leftovers`` (the row that recorded
        them so far, a removal's pod row or an install row, moves there). If that fails it
        stays where it is (logged), and goes once they are out."""
        if self.store is None:
            return
        try:
            self.store.keep_leftover(row)
        except StoreError as exc:
            log.error(
                "cannot record the rules left in the pod store: %s (tried again all the same; the "
                "next start knows of them only from the row that recorded them so far, if any)",
                exc,
                extra=row.spec.log_extra,
            )

    def _ended(self, identity: NetnsIdentity, pod: Pod, left: _Left) -> None:
        """A retry is over: a pod of its netns hands its rules to a new one from now on."""
        if self._netns.get(identity) is left:
            del self._netns[identity]
        pod.close()

    def ours_there(self, identity: NetnsIdentity) -> bool:
        """A cached pod has this node agent's rules in the netns ``identity`` (with rules on,
        the rules of a cached pod whose netns is open are always of this run's rule set):
        leftovers of this rule set there are its rules now (its row records them)."""
        return self.rules is not None and self.cache.has_rules_in(identity)

    async def _retry(self, pod: Pod, left: _Left) -> None:
        """Until the rules are out (their rows go: in ``leftovers``, and where moving them
        there failed, a removal's pod row or an install row for this netns, unless the uid was
        enrolled again or is being enrolled or removed right now), nothing but this fd holds
        the netns any more (neither its path nor any process or named netns: the kernel takes
        the rules out with it once this fd lets it go; the rows go), or the node agent stops
        (the rows stay: the next start takes them out). Those of this node agent's rule set
        in a netns where a cached pod has its rules now are that pod's (its row records them:
        their rows go); a pod living, or being enrolled, there defers the others (the two
        rule sets share the policy routing)."""
        assert pod.netns is not None
        identity = pod.netns.identity
        try:
            await self._until_out(pod, left)
            self._forget(identity, left)
        finally:
            self._ended(identity, pod, left)

    async def _until_out(self, pod: Pod, left: _Left) -> None:
        assert pod.netns is not None
        identity = pod.netns.identity
        pause = defaults.UNDO_RETRY_INITIAL
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 2, defaults.UNDO_RETRY_MAX)
            what = left.what()
            if _gone(pod, self._named_dirs):
                log.info(
                    "%s go with their netns: it is no longer at %s nor anywhere else",
                    what,
                    pod.spec.netns,
                    extra=pod.spec.log_extra,
                )
                return
            if self.rules is not None and self.ours_there(identity):
                # (not the rows of a uid being enrolled or removed now: a re-add elsewhere
                # records them again in its commit, while its old pod still counts here)
                kept = _Left(
                    {
                        key: kinds
                        for key, kinds in left.rows.items()
                        if key[1] == self.rules.name and not self._under_way(key[0])
                    }
                )
                if kept.rows:
                    log.info(
                        "%s are kept: another pod lives in its netns now",
                        kept.what(),
                        extra=pod.spec.log_extra,
                    )
                    self._forget(identity, kept)
                    left.rows = {key: kinds for key, kinds in left.rows.items() if key not in kept.rows}
                    if not left.rows:
                        return
            if await self._take_out(pod, left):
                log.info("%s are taken out now", what, extra=pod.spec.log_extra)
                return

    async def _take_out(self, pod: Pod, left: _Left) -> bool:
        """Try each rule set left there once (one already out is not tried again, unless
        another pod's of that set joined meanwhile): True once all are out."""
        assert pod.netns is not None
        while pending := {backend for _, backend in left.rows} - left.out:
            backend = min(pending)
            if self.rules is not None and self.rules.must_wait(self.cache, pod.netns.identity, backend):
                log.debug(
                    "%s wait: a pod lives in its netns, or one being enrolled there has its rules in",
                    left.what(),
                    extra=pod.spec.log_extra,
                )
                return False
            if self.rules is not None:
                out = await self.rules.undo_again(pod, self.cache, backend)
            else:
                out = await self.remove_earlier(pod, backend)
            if not out:
                return False
            left.out.add(backend)
        return True

    def _forget(self, identity: NetnsIdentity, left: _Left) -> None:
        """The rules ``left`` records are out (or another pod's now): their rows go. A failure
        is logged (the next start takes out rules that are already out)."""
        if self.store is None or not left.rows:
            return
        keys = sorted(left.rows)
        # (a uid enrolled again, or being enrolled or removed: its pod and install rows are its own now)
        rows_of = [(uid, rules) for uid, rules in keys if not self._under_way(uid) and uid not in self.cache]
        try:
            self.store.forget_leftovers(identity, keys, rows_of=rows_of)
        except StoreError as exc:
            log.warning("cannot update the pod store: %s", exc, extra={"uid": keys[0][0]})


def _left_by(old: Pod, new: Pod) -> str:
    """Where ``old``'s rules stay once ``new`` (the same uid) replaces it: ``elsewhere`` (its
    netns is not ``new``'s), ``here`` (the same netns, where ``new`` installs none or the
    other rule set), or '' (nowhere: none, or ``new``'s are the same rules)."""
    was = old.netns.identity if old.netns is not None else old.unopened.identity if old.unopened else None
    if not old.rules_installed or was is None:
        return ""
    if new.netns is None or was != new.netns.identity:
        return "elsewhere"
    return "here" if old.rules_backend != new.rules_backend else ""


def _gone(pod: Pod, dirs: tuple[str, ...]) -> bool:
    """Nothing but the retry's fd holds the pod's netns: neither the place it was enrolled
    from (a path, ``/proc/PID/ns/net``) nor any process or named netns in ``dirs`` (a pod
    recovered from elsewhere, a pid that is gone while the pod's other processes live on)."""
    assert pod.netns is not None
    identity = pod.netns.identity
    if netns_identity_of_path(pod.spec.netns.location) == identity:
        return False
    try:
        return identity not in find_by_identity({identity}, dirs)
    except OutOfFds:
        return False  # (it could not look: not gone for all it knows)


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
        log.error(
            "cannot delete the removed pod's row from the pod store (it stays marked removing: the "
            "next start finishes the removal): %s",
            exc,
            extra={"uid": uid},
        )
