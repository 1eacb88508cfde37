"""Running ``zds check``: options from the flags, the checks, the reports, the exit status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import stat
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from zds import runtime
from zds.check.report import CheckSpec, Report
from zds.errors import ZdsError

if TYPE_CHECKING:
    from zds.check.remains import CheckRecord


def list_checks(checks: Sequence[CheckSpec]) -> int:
    """``--list``: each check's name and description."""
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"{check.name:<{width}}  {check.description}")
    return 0


def run_checks(role: str, args: argparse.Namespace, selected: list[str]) -> int:
    """Run ``zds check ROLE``: 0 when every check that ran held, 1 otherwise, 2 when it cannot start."""
    # The check forks (to make namespaces) while gRPC threads run: gRPC's fork handlers only
    # print a warning for each fork then, and nothing of gRPC is used in the children.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from zds.check.remains import CheckRecord, clear_or_warn

    problem = runtime.privilege_error(f"check {role}")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    # What a check that did not end left goes first, whatever this one's flags (``zds.check.remains``);
    # then, once it will run, this one's record of what it makes, before it makes anything.
    clear_or_warn(role, lambda line: print(line, file=sys.stderr))
    if getattr(args, "agent_pid", None) is not None and not os.path.isdir(f"/proc/{args.agent_pid}"):
        # (a pid given by hand that is not there was a skipped fd-hygiene, and exit 0)
        print(f"zds check {role}: --agent-pid {args.agent_pid}: no such process here", file=sys.stderr)
        return 2
    if role == "node-agent" and (missing := _no_socket(args.zds_socket)):
        # (every check had its own ERROR for it, exit 1: 19 lines saying one thing)
        print(f"zds check {role}: {missing}", file=sys.stderr)
        return 2
    claimed, problem = _claim_reports(args)
    if problem:
        print(f"zds check {role}: {problem}", file=sys.stderr)
        return 2
    try:
        record = CheckRecord()
    except ZdsError as exc:
        _close_all(claimed)
        print(f"zds check {role}: {exc}", file=sys.stderr)
        return 2
    written: set[str] = set()
    try:
        try:
            report = asyncio.run(_run(role, args, selected, record))
        except ZdsError as exc:
            print(f"zds check {role}: {exc}", file=sys.stderr)
            return 2
        except asyncio.CancelledError:
            signum = _stopped_by[-1] if _stopped_by else signal.SIGTERM
            stopped = runtime.how_stopped(runtime.Stopped(signum))  # ("interrupted": Ctrl-C)
            print(f"zds check {role}: {stopped}; what it made is removed", file=sys.stderr)
            return 128 + signum
        # The report files first: a stdout whose reader went away (``| head -1``) ends the
        # command in the write to it, and they were lost with it.
        for claim in claimed:
            try:
                claim.write(report.render_json() if claim.flag == "--json" else report.render_junit())
            except OSError as exc:
                print(f"zds check {role}: cannot write {claim.path}: {exc.strerror}", file=sys.stderr)
                return 2
            written.add(claim.flag)
        sys.stdout.write(report.render_text())
        sys.stdout.flush()
        return 0 if report.ok else 1
    finally:
        record.done()  # (after everything it names is removed)
        for claim in claimed:  # (one made here and not written whole goes again)
            claim.close(remove_made=claim.flag not in written)


class _Claimed(NamedTuple):
    """A report file opened before the run (``--json``/``--junit``), written through the same
    fd after it: a FIFO's reader, kept waiting, reads it (opened again, a reader that had
    seen the first close was gone and the write waited for good)."""

    flag: str
    path: str
    fd: int
    #: The file made for it (where a symlink led), removed again if no report is written.
    made: str | None

    def write(self, text: str) -> None:
        os.set_blocking(self.fd, True)
        if stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.ftruncate(self.fd, 0)
        with open(self.fd, "w", closefd=False) as out:
            out.write(text)

    def close(self, *, remove_made: bool) -> None:
        os.close(self.fd)
        if remove_made and self.made is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.made)


def _claim_reports(args: argparse.Namespace) -> tuple[list[_Claimed], str]:
    """Each ``--json``/``--junit`` file opened for writing before anything runs (a path that
    could not be written was found out only after the whole run), nothing written yet; or
    none, and why one cannot be written."""
    claimed: list[_Claimed] = []
    for flag, path in (("--json", args.json), ("--junit", args.junit)):
        if not path:
            continue
        try:
            fd, made = _open_report(path)
        except OSError as exc:
            _close_all(claimed)
            return [], f"{flag} {path}: cannot write it: {exc.strerror}"
        claimed.append(_Claimed(flag, path, fd, made))
    return claimed, ""


def _open_report(path: str) -> tuple[int, str | None]:
    """The report file opened for writing, not truncated yet (O_NONBLOCK: a FIFO nobody reads
    is refused, not waited on), and the file made for it (None: it was there). Made only
    where nothing is, never over one another process made meanwhile; where a dangling symlink
    leads, made there."""
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666), path
    except FileExistsError:
        pass
    try:
        return os.open(path, flags), None
    except FileNotFoundError:
        if not os.path.islink(path):
            raise
    target = os.path.realpath(path)
    return os.open(target, flags | os.O_CREAT | os.O_EXCL, 0o666), target


def _close_all(claimed: list[_Claimed]) -> None:
    for claim in claimed:
        claim.close(remove_made=True)


def _no_socket(path: str) -> str:
    """Why no node agent can be listening at ``path`` ('' when a socket is there)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return ""
    except FileNotFoundError:
        return f"no node agent socket at {path} (is the node agent running? --zds-socket names its socket)"
    except OSError as exc:
        return f"cannot use {path}: {exc.strerror}"
    return f"{path} is not a socket (--zds-socket names the node agent's ZDS socket)"


async def _run(role: str, args: argparse.Namespace, selected: list[str], record: CheckRecord) -> Report:
    # SIGTERM stops the run as Ctrl-C does (cancelled, its clean-up takes out the namespaces
    # and processes it made): it had killed the check where it stood, leaving them. Ctrl-C too
    # is taken here, as zds server and zds demo take it: a SIGINT the check was started with
    # ignored (a script's background job) stayed ignored under asyncio's own handling.
    main = asyncio.current_task()
    assert main is not None
    handler = _on_sigterm(os.getpid(), asyncio.get_running_loop(), main)
    _stopped_by.clear()
    old = {sig: signal.signal(sig, handler) for sig in runtime.stop_signals()}
    try:
        return await _checks(role, args, selected, record)
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


async def _checks(role: str, args: argparse.Namespace, selected: list[str], record: CheckRecord) -> Report:
    if role == "node-agent":
        from zds.check.agentrun import run_agent_checks
        from zds.check.agentsession import AgentCheckOptions

        commands = args.add_cmd is not None
        options = AgentCheckOptions(
            zds_socket=args.zds_socket,
            control_socket=None if commands else args.control_socket,
            add_cmd=args.add_cmd,
            remove_cmd=args.remove_cmd,
            agent_pid=args.agent_pid,
            ack_deadline=args.ack_deadline,
            grace=args.grace,
            hello_wait=args.hello_wait,
            timeout=args.timeout,
            cycles=args.cycles,
            settle=args.settle,
        )
        return await run_agent_checks(options, selected, record)
    from zds.check.pods import check_template
    from zds.check.ztrun import ZtunnelCheckOptions, run_ztunnel_checks

    # (before anything is made: a bad one was a KeyError traceback, or failed a run midway)
    for flag, template in (
        ("--cmd", args.cmd),
        ("--ready-url", args.ready_url),
        ("--config-dump-url", args.config_dump_url),
    ):
        if template:
            check_template(flag, template, ("socket", "admin_port", "readiness_port", "metrics_port"))
    zoptions = ZtunnelCheckOptions(
        cmd=args.cmd,
        zds_socket=args.zds_socket,
        ready_url=args.ready_url,
        config_dump_url=args.config_dump_url,
        protocol_only=args.protocol_only,
        retry_interval=args.retry_interval,
        connect_timeout=args.connect_timeout,
        timeout=args.timeout,
        grace=args.grace,
    )
    return await run_ztunnel_checks(zoptions, selected, record)


#: The signals that stopped the run (SIGTERM, SIGHUP), in order.
_stopped_by: list[int] = []


def _on_sigterm(pid: int, loop: asyncio.AbstractEventLoop, main: asyncio.Task[Report]) -> Any:
    """A stop signal's handler (SIGTERM, SIGINT, SIGHUP) that cancels ``main`` once (a second
    one does not cut its clean-up short). Not asyncio's add_signal_handler: a child forked to
    make a netns would pass its own SIGTERM on to the check through the loop's wakeup socket;
    here a forked child dies of its own as it would have."""

    def handler(signum: int, _frame: object) -> None:
        if not runtime.in_forked_child(pid, signum):
            _stopped_by.append(signum)
            loop.call_soon_threadsafe(_stop, main)

    return handler


def _stop(main: asyncio.Task[Report]) -> None:
    if not main.done() and not main.cancelling():
        main.cancel()
