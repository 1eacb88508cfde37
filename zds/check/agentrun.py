"""``zds check node-agent``: run the selected checks against a node agent and report.

The scenarios that exercise the selected checks run in a fixed order, the first
one always (its first snapshot tells what the agent held before the check).
Every netns the check made is deleted at the end, and every connection closed,
whatever happened.
"""

from __future__ import annotations

import errno
import time

from zds.check.agentchecks import RECORD_CHECKS, SCENARIOS, scenario_of
from zds.check.agentscenarios import SCENARIO_FUNCS, judge_held
from zds.check.agentsession import AgentCheckOptions, AgentSession
from zds.check.pods import CheckSetupError, CommandDriver, ControlDriver, PodDriver, PodFactory
from zds.check.remains import CheckRecord
from zds.check.report import Report
from zds.check.strictpeer import CannotConnect
from zds.errors import ZdsError


def make_driver(options: AgentCheckOptions) -> PodDriver:
    if options.add_cmd is not None and options.remove_cmd is not None:
        return CommandDriver(options.add_cmd, options.remove_cmd)
    assert options.control_socket is not None
    return ControlDriver(options.control_socket)


async def run_agent_checks(options: AgentCheckOptions, selected: list[str], record: CheckRecord) -> Report:
    """Every selected check's result, in catalogue order (what it makes in ``record`` first)."""
    report = Report("node-agent", options.zds_socket)
    driver = make_driver(options)
    factory = PodFactory(record)
    session = AgentSession(options, driver, factory)
    if "hello-first" not in selected:
        options.hello_wait = 0.0
    wanted = {scenario_of(name) for name in selected}
    durations: dict[str, float] = {}
    try:
        await driver.ready()
        for scenario in SCENARIOS:
            if scenario not in wanted and scenario != "hello-wait":
                continue
            started = time.monotonic()
            try:
                await SCENARIO_FUNCS[scenario](session)
            except (ZdsError, OSError, TimeoutError) as exc:
                if isinstance(exc, CannotConnect) and not session.connection_count:
                    # (the run cannot start: each check had its own ERROR for it, exit 1)
                    raise CheckSetupError(_cannot_start(exc)) from exc
                _stopped(session, scenario, selected, exc)
                if scenario == "hello-wait":
                    break  # not even the first connection worked: the others would fail alike
            durations[scenario] = time.monotonic() - started
        judge_held(session)  # (findings of checks not selected are not reported)
    finally:
        await session.shutdown()
        await session.take_back()
        await driver.close()
        factory.close()
    report.context = [
        f"node agent pid {session.agent_pid}" if session.agent_pid else "node agent pid unknown",
        driver.describe(),
        f"{factory.count} pods made, each in its own netns (all deleted again); "
        f"{len(session.seen)} records received on {session.connection_count} connections",
    ]
    report.results = [session.result(name, durations.get(scenario_of(name), 0.0)) for name in selected]
    report.finish()
    return report


def _cannot_start(exc: CannotConnect) -> str:
    """The first connection failed: why, and what to look at."""
    why = {
        errno.ECONNREFUSED: "nothing listens there: a socket file left by a node agent that is gone",
        errno.EPROTOTYPE: "it is not a SOCK_SEQPACKET socket, which a ZDS socket is",
    }.get(exc.errno or 0, "is the node agent running?")
    return f"{exc} ({why}); --zds-socket names the node agent's ZDS socket"


def _stopped(session: AgentSession, scenario: str, selected: list[str], exc: BaseException) -> None:
    """A scenario could not go on: its own checks error (all of them when it was the first);
    the record checks say so, and error only if nothing else exercised them."""
    why = f"scenario {scenario} stopped: {exc}"
    for name in selected:
        if (scenario_of(name) == scenario and name not in RECORD_CHECKS) or scenario == "hello-wait":
            session.errors.setdefault(name, why)
        elif name in RECORD_CHECKS:
            session.note(name, why)
