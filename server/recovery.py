"""Recovery on start: the pod store back into the pod cache, before any ztunnel is served.

For each stored pod the node agent reopens its netns and checks that it is the
same one (``st_dev``, ``st_ino``): a recycled pid or a named netns recreated
under the same name is *not* the pod's. When the path is gone or holds another
netns, the pod's own is looked for by identity in ``/proc/*/ns/net`` and the
named namespaces (Istio's agent scans ``/proc`` too, ``podcgroupns.go``). A pod
whose netns is found gets its rules checked (present and equal: left alone;
missing or different: reinstalled). A pod whose netns is nowhere stays known
and goes out as KeepWorkload, as Istio sends it for a pod whose netns it cannot
find, so ztunnel keeps serving it and drops nothing; so does one whose path is at
a place this run does not allow (``--netns-root`` changed), unless its netns is
found by identity where it is allowed: never opened there, its rules untouched.
Only a row naming the node's netns, or names zds refuses, is dropped. A removal that a crash
interrupted is finished, and so is an enrollment it interrupted while its rules went in
(the store's ``installs`` table): those rules, which no pod row records, come out of
their netns, unless a recovered pod has this run's rules there (they are its rules), as do
the rules an earlier run could not take out (the store's ``leftovers``); rules that will not
come out now, or sit beside a recovered pod's of the same rule set, or beside one recovered
without opening its netns (the two rule sets share the policy routing), are handed to the
retry (``Leftovers``), their rows kept; the other rule set's beside recovered pods with this
one's come out, the policy routing staying. Only then does the agent serve ztunnel, whose
next snapshot holds every pod.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from zds.aio import Cancelled, to_its_end
from zds.netns import NetnsIdentity, netns_cookie
from zds.server.enrollment import Enrollment
from zds.server.podcache import Pod, Unopened
from zds.server.podrules import PodRules, RulesError
from zds.server.refind import Found, reopen, search, vouch_for_cookieless, why_refused
from zds.server.store import PodStore
from zds.server.storefile import StoreError
from zds.server.storerows import StoredPod

log = logging.getLogger("zds.server.recovery")

#: Rule checks and reinstalls run this many at a time (each is a worker thread in a netns).
CONCURRENCY = 8


class RecoveryOutcome(enum.Enum):
    """How a stored pod came back (``zds pod list`` shows it)."""

    #: Its netns reopened at the same path, the same one; its rules as they were.
    RESTORED = "restored"
    #: The same netns; its rules were missing or different, so they were installed again.
    RULES_REINSTALLED = "rules reinstalled"
    #: Its path was gone or held another netns; its own netns was found by identity elsewhere.
    FOUND_ELSEWHERE = "netns found elsewhere"
    #: Its netns is nowhere (the pod is gone): known, sent as KeepWorkload.
    NETNS_GONE = "netns gone"
    #: Its path holds another netns now (a recycled pid, a recreated named netns) and its own is
    #: nowhere: that other netns is not taken for the pod; known, sent as KeepWorkload.
    NETNS_REPLACED = "netns replaced"
    #: Stored without a netns (its netns could not be opened when it was loaded): KeepWorkload.
    WITHOUT_NETNS = "known without netns"
    #: Its netns was found but its rules could not be installed again (see the log); served anyway.
    RULES_FAILED = "rules failed"
    #: A removal the last run began and did not finish: finished now.
    REMOVAL_FINISHED = "removal finished"
    #: Such a removal whose rules could not be taken out now: its row moves to ``leftovers``, and
    #: taking them out is tried again in the background (``Leftovers``).
    REMOVAL_RETRIED = "removal retried"
    #: Such a removal whose netns cannot be opened now (a place this run does not allow, no
    #: fd to spare): its row moves to ``leftovers``, for a later start.
    REMOVAL_LEFT = "removal left"
    #: Its path is at a place this run does not allow (``--netns-root`` changed) and its netns
    #: was not found by identity elsewhere: not opened; known, its row kept, sent as KeepWorkload.
    PLACE_REFUSED = "netns place not allowed"
    #: Its netns could not be opened or looked for now, for want of an fd (the node agent at
    #: its fd limit): not taken for gone; known, its row kept, sent as KeepWorkload.
    NETNS_NOT_OPENED = "netns not opened (no fd)"
    #: Its row names the node's own netns: dropped from the store, nothing touched. (A row with
    #: names zds refuses now is removed instead: REMOVAL_FINISHED, its rules taken out.)
    REFUSED = "refused"


@dataclass
class RecoveryReport:
    """What recovery did, pod by pod."""

    outcomes: dict[str, RecoveryOutcome] = field(default_factory=dict)

    def summary(self) -> str:
        counts = Counter(outcome.value for outcome in self.outcomes.values())
        return ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no pods"


async def recover(store: PodStore, enrollment: Enrollment) -> RecoveryReport:
    """Rebuild ``enrollment``'s pod cache from ``store``; nothing is sent to ztunnel here."""
    report = RecoveryReport()
    policy = enrollment.policy
    interrupted = {_key(row) for row in store.installs_to_leftovers()}
    left_rows = store.load_leftovers()  # (before this start adds its own)
    rows = []
    for row in store.load():
        if refused := why_refused(row, policy, names=False):
            # Never the node, not even from the store: the row goes, nothing is touched.
            log.error(
                "pod refused on reload, dropped from the pod store: %s", refused, extra=row.spec.log_extra
            )
            store.delete(row.spec.uid)
            report.outcomes[row.spec.uid] = RecoveryOutcome.REFUSED
        elif not row.removing and (refused := why_refused(row, policy)):
            # Names this version refuses (an earlier one took them, or the row was edited): not
            # served again, but removed as a removal is, its rules taken out (the row alone
            # dropped left them in the pod's netns, recorded nowhere).
            log.error("pod refused on reload, removed: %s", refused, extra=row.spec.log_extra)
            store.mark_removing(row.spec.uid)
            rows.append(dataclasses.replace(row, removing=True))
        else:
            rows.append(row)
    found = [reopen(row, policy) for row in rows]
    search([f for f in found if f.netns is None and f.row.identity is not None], policy)
    await vouch_for_cookieless(found)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    #: The netns of the pods coming back (a removal's rules there wait for them: a restored
    #: pod's own are the same rules, or share its policy routing).
    homes = {row.identity for row in rows if not row.removing and row.identity is not None}
    swept: set[tuple[NetnsIdentity, str]] = set()

    reached: set[int] = set()

    async def one(item: Found) -> None:
        async with semaphore:
            reached.add(id(item))
            report.outcomes[item.row.spec.uid] = await _restore(item, store, enrollment, homes, swept)

    tasks = [asyncio.ensure_future(one(item)) for item in found]
    try:
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        # A stop during recovery: the pods' tasks end first (a reinstall under way goes in to
        # its end: ``to_its_end``), then the netns handles of the pods they never reached are
        # closed. The gather cancelled each of them already and ends with the first that ends: a
        # second cancel would cut short a task waiting for its worker thread in the netns
        # (run_in_netns), which then ran on, with its dup of the netns fd, past the stop.
        if pending := [task for task in tasks if not task.done()]:
            await asyncio.wait(pending)  # (a second stop stops this wait)
        for task in tasks:
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("stopping: a pod's recovery failed: %s", exc)
        for item in found:
            if id(item) not in reached and item.netns is not None:
                item.netns.close()
        raise
    for uid, outcome in report.outcomes.items():
        if outcome in (
            RecoveryOutcome.NETNS_GONE,
            RecoveryOutcome.NETNS_REPLACED,
            RecoveryOutcome.PLACE_REFUSED,
            RecoveryOutcome.NETNS_NOT_OPENED,
        ):
            log.warning(
                "pod recovered without its netns (%s): sent to ztunnel as KeepWorkload",
                outcome.value,
                extra={"uid": uid},
            )
    if rows:
        log.info("recovered %d pod(s) from %s: %s", len(rows), store.path, report.summary())
    await _finish_leftovers(store, enrollment, left_rows, interrupted)
    return report


#: What tells a ``leftovers`` row from another (its table's key): uid, netns dev and inode, rule set.
RowKey = tuple[str, int | None, int | None, str]


def _key(row: StoredPod) -> RowKey:
    """``row``'s ``RowKey``."""
    identity = row.identity
    return (row.spec.uid, *((identity.dev, identity.ino) if identity else (None, None)), row.rules)


async def _finish_leftovers(
    store: PodStore, enrollment: Enrollment, rows: list[StoredPod], interrupted: set[RowKey]
) -> None:
    """Take out the rules an earlier run could not take out (``Leftovers``; its ``rows``) and
    those of the enrollments it was installing when it ended (``interrupted``, moved here
    from ``installs``), after the pods are back (a recovered pod in the same netns keeps
    them), or hand them back to the retry."""

    def said(row: StoredPod) -> str:
        if _key(row) in interrupted:
            return "an enrollment a stop or crash interrupted while its rules went in"
        return f"rules a failed {'removal' if row.removing else 'install'} left before this start"

    kept = await _take_out(rows, enrollment, said, recorded=True)
    for row in rows:
        if id(row) not in kept:
            store.forget_leftovers(row.identity, [(row.spec.uid, row.rules)])


async def _take_out(
    rows: list[StoredPod], enrollment: Enrollment, said: Callable[[StoredPod], str], *, recorded: bool = False
) -> set[int]:
    """Take the rules each row records out of its netns (unless a recovered pod has this run's
    rules there: they are its rules); the ``id`` of each row whose rules stay in and stay
    recorded (handed to the retry, ``Leftovers``, or in a netns at a place this run does not
    allow)."""
    found = []
    for row in rows:
        # (never the node's netns: the row goes, nothing is touched; names do not matter here,
        # the rules come out of the netns the row records whatever the pod was called)
        refused = why_refused(row, enrollment.policy, names=False)
        if refused:
            log.error("%s: refused, its row dropped: %s", said(row), refused, extra=row.spec.log_extra)
        else:
            found.append(reopen(row, enrollment.policy))
    search([f for f in found if f.netns is None and f.row.identity is not None], enrollment.policy)
    kept: set[int] = set()
    for item in found:
        row = item.row
        pod = Pod(spec=row.spec, netns=item.netns, rules_installed=True, rules_backend=row.rules)
        try:
            if pod.netns is None:
                what = "its netns is gone"
                if item.place_refused or item.unreachable:
                    what = (
                        f"its netns cannot be looked for now ({item.unreachable}): left as it is, recorded"
                        if item.unreachable
                        else "its netns is at a place this run does not allow (--netns-root): left as it is, "
                        "recorded"
                    )
                    if not recorded:
                        enrollment.leftovers.keep_row(row)
                    kept.add(id(row))
            elif enrollment.leftovers.ours_there(pod.netns.identity) and (
                enrollment.rules is not None and row.rules == enrollment.rules.name
            ):
                what = "its rules kept: a recovered pod lives in its netns"
            else:
                rules, identity = enrollment.rules, pod.netns.identity
                beside = rules is not None and enrollment.cache.in_use(identity)
                if rules is not None and rules.must_wait(enrollment.cache, identity, row.rules):
                    # (beside a recovered pod, also one whose netns was not opened: not while it
                    # lives there, the rule sets share the policy routing)
                    what = "a recovered pod lives in its netns: taken out once it is gone"
                else:
                    # (the other rule set's, beside recovered pods with this one's: the policy
                    # routing they share stays; a pod kept both sets for as long as it lived)
                    what = "what went in is taken out" + (
                        ", beside a recovered pod's rules (the policy routing stays)" if beside else ""
                    )
                    await _remove_recorded_rules(pod, row.rules, enrollment)
                    if pod.rules_installed:
                        what = "what went in could not be taken out: tried again in the background"
                if pod.rules_installed:
                    enrollment.leftovers.retry(pod, removal=row.removing, recorded=recorded)
                    kept.add(id(row))
        finally:
            if id(row) not in kept:
                pod.close()
        log.warning("%s: %s", said(row), what, extra=row.spec.log_extra)
    return kept


async def _restore(
    item: Found,
    store: PodStore,
    enrollment: Enrollment,
    homes: set[NetnsIdentity],
    swept: set[tuple[NetnsIdentity, str]],
) -> RecoveryOutcome:
    """Restore one stored pod (``homes``: the netns of the pods coming back; ``swept``: the
    netns and rule sets whose other backend's rules a pod restored before took care of)."""
    row = item.row
    pod = Pod(spec=row.spec, netns=item.netns, enrolled_at=row.enrolled_at)
    pod.rules_installed, pod.rules_backend, pod.rules_digest = bool(row.rules), row.rules, row.rules_digest
    rules = enrollment.rules
    if row.removing:
        retried = left = False
        # (beside a pod coming back its rules stay, on purpose: not a failure to say so)
        beside_home = rules is not None and row.identity in homes
        try:
            if pod.netns is not None and pod.rules_installed:
                if not beside_home:
                    await _remove_recorded_rules(pod, row.rules, enrollment)
                # Not out (or beside a pod coming back): its row moves to leftovers (the
                # next start tries again), and taking them out is tried again meanwhile.
                retried = enrollment.leftovers.take_if_left(pod, removal=True)
            elif pod.rules_installed and (item.place_refused or item.unreachable):
                # Recorded for a later start, in leftovers (a re-add of the uid leaves it alone)
                enrollment.leftovers.keep_row(row)
                left = True
            if not retried and not left:
                store.delete(row.spec.uid)
        finally:
            if not retried:
                pod.close()
        if left:
            log.warning(
                "the removal the last run began: its netns cannot be opened now (%s); its rules "
                "stay where they are, recorded",
                item.unreachable or "a place this run does not allow",
                extra=row.spec.log_extra,
            )
            return RecoveryOutcome.REMOVAL_LEFT
        if retried:
            (log.info if beside_home else log.warning)(
                "the removal the last run began: %s",
                "its rules stay while a recovered pod lives in its netns; taken out once it is gone"
                if beside_home
                else "its rules could not be taken out; tried again in the background (and at the next start)",
                extra=row.spec.log_extra,
            )
            return RecoveryOutcome.REMOVAL_RETRIED
        log.info("finished the removal the last run began", extra=row.spec.log_extra)
        return RecoveryOutcome.REMOVAL_FINISHED
    if pod.netns is None:
        if row.identity is not None and (item.place_refused or item.unreachable):
            pod.unopened = Unopened(row.identity, row.cookie)  # (it may live on, with the pod's rules)
        outcome = (
            RecoveryOutcome.WITHOUT_NETNS
            if row.identity is None
            else RecoveryOutcome.NETNS_NOT_OPENED
            if item.unreachable
            else RecoveryOutcome.NETNS_REPLACED
            if item.replaced
            else RecoveryOutcome.PLACE_REFUSED
            if item.place_refused
            else RecoveryOutcome.NETNS_GONE
        )
    else:
        try:
            outcome = await _rules_back(pod, item, store, enrollment, swept)
        except BaseException:
            pod.close()  # (a stop during recovery, or a bug: the pod is not restored)
            raise
    pod.recovery = outcome.value
    enrollment.restore(pod)
    return outcome


async def _rules_back(
    pod: Pod, item: Found, store: PodStore, enrollment: Enrollment, swept: set[tuple[NetnsIdentity, str]]
) -> RecoveryOutcome:
    """The rules of a restored pod whose netns is open, back as its row records them (or as
    this run's rule set, or none under --no-redirect); how it came back."""
    assert pod.netns is not None
    row, rules = item.row, enrollment.rules
    outcome = RecoveryOutcome.FOUND_ELSEWHERE if item.elsewhere else RecoveryOutcome.RESTORED
    # This node agent installs none (--no-redirect): what an earlier run installed comes
    # out now, while its row says where (else nothing would ever take it out).
    if rules is None and row.rules and await enrollment.leftovers.remove_earlier(pod, row.rules):
        pod.rules_installed = False
        _rewrite(store, pod, "")
    if rules is not None and not (row.rules == rules.name and await rules.in_place(pod)):
        stop = Cancelled()
        try:
            # (cut short, a reinstall left the pod without rules while its row still named the
            # ones it had, which worked: cancelled, an install takes out what it put in, and
            # those with it; a stop after the other backend's rules came out left none in;
            # bounded: each iptables run ends within 30 s)
            await to_its_end(_reinstall(pod, row, rules, store, enrollment, swept), stop)
        except StoreError as exc:
            log.error("cannot store the pod, its rules not installed: %s", exc, extra=row.spec.log_extra)
            pod.rules_installed = False
            outcome = RecoveryOutcome.RULES_FAILED
        except RulesError as exc:
            log.error("%s", exc, extra=row.spec.log_extra)
            # Refused with nothing touched (a rule of the pod's own now jumps into ours): the
            # rules the row records are still in, and stay recorded (the removal takes them
            # out, as Istio's; forgotten, they stayed in the netns for good).
            pod.rules_installed = exc.refused and row.rules == rules.name
            if not exc.undone:  # (what went in stays, recorded, until the pod is gone)
                enrollment.leftovers.retry_beside(pod, rules.name)
            outcome = RecoveryOutcome.RULES_FAILED
        except Exception as exc:
            if not stop.seen:
                raise
            # (a bug, after the stop came: said, and the stop goes on; the row stays as it was,
            # which the next start reads as ever)
            log.error("reinstalling the pod's rules failed: %r", exc, extra=row.spec.log_extra)
            raise asyncio.CancelledError from exc
        else:
            outcome = RecoveryOutcome.RULES_REINSTALLED if outcome is RecoveryOutcome.RESTORED else outcome
        _rewrite(store, pod, rules.name if pod.rules_installed else "")
        if stop.seen:
            raise asyncio.CancelledError  # (the stop's, held back until the row says what is in)
    return outcome


async def _reinstall(
    pod: Pod,
    row: StoredPod,
    rules: PodRules,
    store: PodStore,
    enrollment: Enrollment,
    swept: set[tuple[NetnsIdentity, str]],
) -> None:
    """This run's rules in the restored pod's netns, in place of what its row records."""
    assert pod.netns is not None
    if row.rules and row.rules != rules.name and (pod.netns.identity, row.rules) not in swept:
        # Installed by the other backend (the agent was restarted with the other
        # --redirect-backend): its rules come out, this one's go in (beside a pod restored in
        # that netns with this one's already, the policy routing the two share stays); if
        # they will not, or a pod recovered without opening that netns lives there, they are
        # taken out once the pod is gone. Once a netns.
        swept.add((pod.netns.identity, row.rules))
        if not await rules.remove_other(pod, row.rules, enrollment.cache):
            enrollment.leftovers.retry_beside(pod, row.rules)
    if row.rules != rules.name:
        # Recorded first, as an enrollment's: a crash before the row is rewritten leaves an
        # install row, and the next start takes them out or keeps them (the row still names
        # the rules it had, or none).
        await store.intend_soon(StoredPod.of(pod, rules=rules.name))
    # (replaces an earlier copy; one recorded as this rule set's comes out if it fails)
    await rules.install(pod, enrollment.cache.has_rules_in, recorded=row.rules == rules.name)


async def _remove_recorded_rules(pod: Pod, backend: str, enrollment: Enrollment) -> None:
    """Take out the rules ``backend`` (as the store recorded it) installed in the pod's netns,
    whichever backend this node agent uses, if any (failures are logged; the pod's
    ``rules_installed`` says whether they are still in)."""
    rules = enrollment.rules
    if rules is None:
        pod.rules_installed = not await enrollment.leftovers.remove_earlier(pod, backend)
    elif backend != rules.name:
        pod.rules_installed = not await rules.remove_other(pod, backend, enrollment.cache)
    else:
        await rules.remove(pod, enrollment.cache.has_rules_in)


def _rewrite(store: PodStore, pod: Pod, rules: str) -> None:
    try:
        identity: NetnsIdentity | None = pod.netns.identity if pod.netns is not None else None
        cookie = netns_cookie(pod.netns) if pod.netns is not None else None
        store.put(
            pod.spec,
            identity,
            rules=rules,
            rules_digest=pod.rules_digest,
            enrolled_at=pod.enrolled_at,
            cookie=cookie,
        )
    except StoreError as exc:
        log.error("cannot update the pod store: %s", exc, extra=pod.spec.log_extra)
