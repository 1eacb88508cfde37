"""The keeper of the ztunnel ``zds check ztunnel --cmd`` starts: it makes the command end with
the check, also when the check is killed by SIGKILL (which the check cannot pass on).

Run as a script, ``python -I -S keeper.py CHECK_PID COMMAND``, by the check in a session of
its own: the keeper leads that session's process group, and runs ``/bin/sh -c COMMAND`` in it,
so everything the command starts is in the group (unless it makes a session of its own). It
then waits for one of two ends, each seen on a pidfd:

- the shell's: the keeper ends as the shell did (its exit status, or its signal), so the
  check sees the command's end as before;
- the check's (the check's pid gone, at once): the keeper stops the group as the check would
  have (SIGTERM, SIGKILL ``GRACE`` seconds later to what is left), then ends.

A pidfd and not PR_SET_PDEATHSIG on the shell: the signal reached the shell alone, not what it
started (a ztunnel behind ``env ...``, a ``cmd &``), and nothing told it from the group's own
SIGTERM. The stop signals the check sends the group are the shell's to act on: the keeper
only waits for the shell's end (a handler, not SIG_IGN: the shell gets their defaults back at
its exec). Only the standard library (``-I -S``): it starts in a few milliseconds.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import sys
import time

#: How long the command's processes get after SIGTERM once the check is gone (as the check's own stop).
GRACE = 10.0
#: How often the group is looked at while it stops.
POLL = 0.05


def main(argv: list[str]) -> int:
    """Run the command (``argv``: the check's pid, the command) and end as it ends."""
    check, command = int(argv[1]), argv[2]
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _ignored)
    try:
        watch = os.pidfd_open(check)
    except ProcessLookupError:
        return 1
    if os.getppid() != check:  # (the check died before its pidfd was taken: nothing to run for)
        return 1
    shell = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", command], os.environ)
    ended = os.pidfd_open(shell)
    poller = select.poll()
    poller.register(watch, select.POLLIN)
    poller.register(ended, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if ended in ready:
            return _as_ended(os.waitpid(shell, 0)[1])
        if watch in ready:
            _stop_group(shell)
            return 1


def _ignored(_signum: int, _frame: object) -> None:
    """A stop signal for the group: the shell's to act on; the keeper follows its end."""


def _stop_group(shell: int) -> None:
    """SIGTERM to the group (the keeper's own), then SIGKILL to what is left after GRACE."""
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline:
        if shell and os.waitpid(shell, os.WNOHANG)[0]:
            shell = 0
        if not shell and not _others_in(group):
            return
        time.sleep(POLL)
    os.killpg(group, signal.SIGKILL)  # (the keeper too)


def _others_in(group: int) -> bool:
    """Whether a process of ``group`` other than the keeper still runs (a zombie does not)."""
    me, wanted = os.getpid(), str(group).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if fields[2:3] == [wanted] and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _as_ended(status: int) -> int:
    """The shell's exit status; or, killed by a signal, the keeper killed by it too."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # (the shell's core, if any, is the one)
        if signum != signal.SIGKILL:  # (its disposition cannot be set: EINVAL)
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
