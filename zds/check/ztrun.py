"""``zds check ztunnel``: run the selected checks against a ztunnel and report.

Checks run in catalogue order, each scenario once; the ones that stop the
ztunnel for good run last, each but the last followed by a restart. The socket, every netns
and the ztunnel process zds started are gone at the end, whatever happened.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from zds.check import ztrefusals as refusals
from zds.check import ztscenarios as scenarios
from zds.check.remains import CheckRecord
from zds.check.report import Report, verdict
from zds.check.ztbench import Bench, ZtunnelCheckOptions, ZtunnelGone
from zds.check.ztchecks import BY_NAME, FATAL, LISTENERS
from zds.errors import ZdsError

__all__ = ["ZtunnelCheckOptions", "run_ztunnel_checks"]

Scenario = Callable[[Bench], Awaitable[None]]


async def exchange(b: Bench) -> None:
    """Two connections with an empty snapshot each (hello, answers, a reconnect)."""
    await b.fresh([])
    await b.fresh([])


#: Which scenario judges each check.
SCENARIO: dict[str, Scenario] = {
    "hello": exchange,
    "replies-canonical": exchange,
    "reconnect": exchange,
    "snapshot-sent-acked": exchange,
    "speaks-only-when-asked": refusals.speaks_only_when_asked,
    "add-acked": scenarios.add_acked,
    "listeners-in-pod": scenarios.listeners,
    "no-listeners-on-host": scenarios.listeners,
    "listeners-closed-on-del": scenarios.listeners,
    "del-unknown-uid": scenarios.del_unknown_uid,
    "readd-same-netns": scenarios.readd_same_netns,
    "readd-new-netns": scenarios.readd_new_netns,
    "reconcile": scenarios.reconcile,
    "proxy-start-failure": scenarios.proxy_start_failure,
    "pending-retry": scenarios.pending_retry,
    "readiness": scenarios.readiness,
    "oversize-record": refusals.oversize_record,
    "undecodable-record": refusals.undecodable_record,
    "no-payload": refusals.no_payload,
    "add-without-fd": refusals.add_without_fd,
    "add-with-two-fds": refusals.add_with_two_fds,
    "fd-on-non-add": refusals.fd_on_non_add,
    "empty-record": refusals.empty_record,
    "add-without-workload-info": refusals.add_without_workload_info,
    "keep-after-snapshot": refusals.keep_after_snapshot,
    "second-snapshot-sent": refusals.second_snapshot_sent,
}

#: Evidence counted for the checks judged over the whole run.
EVIDENCE = {
    "hello": "connections, each opened with 08 01",
    "replies-canonical": "answers, each a canonical WorkloadResponse{ack} without fd",
    "reconnect": "reconnects after the node agent closed, each at once",
    "snapshot-sent-acked": "empty snapshots, each acked",
}

#: Said when checks failed, pods were looked at for the ztunnel's listeners and none was ever seen
#: (nor an Add nacked for its port taken): the listener checks cannot hold against a ztunnel that
#: opens none, which --protocol-only is for.
NO_LISTENERS = (
    "no pod ever had a listener: a ztunnel that opens none is judged with --protocol-only "
    "(and --config-dump-url, for the reconcile)"
)


async def run_ztunnel_checks(
    options: ZtunnelCheckOptions, selected: list[str], record: CheckRecord
) -> Report:
    bench = Bench(options, record)
    try:
        return await _run(bench, options, selected)
    finally:
        bench.remove_tmp()  # also when the check cannot start, or is stopped (it was left then)


async def _run(bench: Bench, options: ZtunnelCheckOptions, selected: list[str]) -> Report:
    report = Report("ztunnel", options.cmd or bench.socket_path)
    order = [n for n in selected if n not in FATAL] + [n for n in selected if n in FATAL]
    durations: dict[str, float] = {}
    try:
        # (a ztunnel that never connects: the check cannot start, said in one line, exit 2)
        await bench.start()
        await bench.reconnected(first=True)
        await _run_scenarios(bench, options, selected, order, durations)
    finally:
        await bench.close()
    report.context = _context(bench)
    report.results = [
        verdict(
            BY_NAME[name],
            findings=bench.findings.get(name, []),
            notes=bench.notes.get(name, []),
            exercised=bench.exercised[name],
            duration=durations.get(name, 0.0),
            error=bench.errors.get(name),
            skipped=bench.skipped.get(name),
            evidence=EVIDENCE.get(name, ""),
        )
        for name in selected
    ]
    report.finish()
    if not report.ok and not options.protocol_only and bench.listener_looks and not bench.listener_signs:
        report.context.append(NO_LISTENERS)
    if not report.ok and options.cmd:
        report.context += ["the ztunnel's last output:", *(f"  {line}" for line in bench.log_tail())]
    return report


async def _run_scenarios(
    bench: Bench,
    options: ZtunnelCheckOptions,
    selected: list[str],
    order: list[str],
    durations: dict[str, float],
) -> None:
    """Each scenario once, in order; a ztunnel that does not come back ends the run, and the
    checks not judged by then are errors (the ones judged keep their verdict)."""
    done: set[Scenario] = set()
    finished: set[Scenario] = set()  # (run to the end, or stopped by an error of their own)
    try:
        for name in order:
            if options.protocol_only and name in LISTENERS:
                bench.skipped[name] = "the ztunnel opens no listeners (--protocol-only)"
                continue
            scenario = SCENARIO[name]
            if scenario in done:
                continue
            if bench.stopped is not None:  # (never after the last check: nothing needs it then)
                await refusals.restart(bench)
            done.add(scenario)
            started = time.monotonic()
            try:
                await scenario(bench)
            except ZtunnelGone:
                raise
            except (ZdsError, OSError, TimeoutError) as exc:
                for other in selected:
                    if SCENARIO[other] is scenario:
                        bench.errors.setdefault(other, f"stopped: {exc}")
            finished.add(scenario)
            took = time.monotonic() - started
            for other in selected:
                if SCENARIO[other] is scenario:
                    durations[other] = took
    except ZtunnelGone as gone:
        for name in selected:
            if SCENARIO[name] not in finished and not bench.findings.get(name) and name not in bench.skipped:
                bench.errors.setdefault(name, f"not run to the end: {gone}")


def _context(bench: Bench) -> list[str]:
    lines = [
        f"zds listened on {bench.socket_path}"
        + (f"; started the ztunnel {bench.starts} time(s)" if bench.starts else "")
    ]
    lines.append(f"ztunnel pid {bench.pid} (SO_PEERCRED)" if bench.pid else "ztunnel pid unknown")
    lines.append(f"{bench.pods.count} pods made, each in its own netns (all deleted again)")
    return lines
