"""A Ctrl-C or a SIGTERM at any moment of a zds command: at most one line, exit 128 + the
signal, never a traceback or an "Exception ignored" message, nothing left behind."""

from __future__ import annotations

import random
import secrets
import signal
import subprocess
import sys
import time

import pytest

from tests.harness import ROOT, ZDS, catches, wait_until

#: ``zds/__main__.py`` run as ``python -m zds`` runs it (as ``__main__``), or ``run`` of it
#: called as the ``zds`` program pyproject.toml makes does; compiled, or imported, before the
#: child says it is ready, so that what comes after is zds's own start-up only (a Ctrl-C in
#: the interpreter's own, before any of zds is run, is the interpreter's to report).
_AS_MAIN = f"""
import sys
code = compile(open({str(ROOT / "zds" / "__main__.py")!r}).read(), "__main__.py", "exec")
sys.stdout.write("ready\\n"); sys.stdout.flush()
exec(code, {{"__name__": "__main__"}})
"""
_AS_PROGRAM = """
import sys
from zds.__main__ import run
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.exit(run())
"""


def interrupted(argv: list[str], sig: int, after: float, *, ready: str = "") -> tuple[int, str]:
    """Run ``argv``; once it is ready (it printed ``ready``, else it took SIGTERM over), wait
    ``after`` seconds and send it ``sig``: its exit status and what it printed then."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if ready:
            assert proc.stdout is not None and proc.stdout.readline() == ready
        else:
            wait_until(lambda: proc.poll() is not None or catches(proc.pid, signal.SIGTERM), "SIGTERM taken")
        time.sleep(after)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err + out


@pytest.mark.root
def test_an_interrupt_while_netns_speaks_netlink_is_128_plus_the_signal_and_nothing_said() -> None:
    """Every IPRoute of zds netns is opened and closed with the stop signals held
    (``fixtures.iproute``): an interrupt inside pyroute2 left its event loop half-made or
    unclosed, and "Exception ignored in: <coroutine object AsyncNetlinkSocket.setup_endpoint>
    ... RuntimeError: Event loop is closed" came out at exit (about 1 in 30 runs here, with a
    netlink socket opened for each name; 4 in 114 of ``zds netns create --bridge``)."""
    names = [f"zdst-{secrets.token_hex(3)}-{i}" for i in range(2000)]  # (none exists: none is made)
    said: list[str] = []
    for _ in range(150):
        sig = random.choice([signal.SIGINT, signal.SIGTERM])
        argv = [*ZDS, "netns", "delete", "--missing-ok", "--force", *names]
        code, out = interrupted(argv, sig, random.uniform(0, 0.1))  # (a name: ~1 ms of netlink)
        if (code, out) != (128 + sig, ""):
            said.append(f"{sig.name}: exit {code}: {out}")
    assert said == []


def test_an_interrupt_raised_in_a_finalizer_is_not_printed_and_is_raised_again() -> None:
    """The garbage collector runs a ``__del__`` wherever it runs (pyroute2's closed event loops
    are freed so): an interrupt raised in it was printed as "Exception ignored in ...", then
    raised at the next ``check_interrupted``. Now it is only raised."""
    code = """
import sys, time
from zds import runtime

class Finalized:
    def __del__(self):
        time.sleep(0.0005)
        sum(range(2000))

sys.stdout.write("ready\\n"); sys.stdout.flush()
try:
    with runtime.Interrupts():
        end = time.monotonic() + 5
        while time.monotonic() < end:
            Finalized()
            runtime.check_interrupted()
except KeyboardInterrupt as exc:
    sys.exit(runtime.interrupt_exit_code(exc))
"""
    for sig in (signal.SIGINT, signal.SIGTERM) * 5:
        done = interrupted([sys.executable, "-c", code], sig, random.uniform(0.01, 0.05), ready="ready\n")
        assert done == (128 + sig, "")


def test_an_interrupt_raised_at_check_is_not_raised_again_at_a_later_sections_end() -> None:
    """One swallowed in a ``__del__`` waits for a held section's end, or ``check()``: raised at
    ``check()``, it is not raised a second time by the clean-up's held sections after it."""
    code = """
import os, signal, sys
from zds import runtime

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # (its handler raises here: swallowed)

with runtime.Interrupts() as interrupts:
    Finalized()
    try:
        interrupts.check()
    except KeyboardInterrupt:
        print("raised at check")
    for _ in range(2):
        with runtime.interrupts_held():  # (a clean-up's sections)
            pass
    print("clean-up done")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.split("\n"), done.stderr) == (
        0,
        ["raised at check", "clean-up done", ""],
        "",
    )


@pytest.mark.root
@pytest.mark.parametrize("entry", [_AS_MAIN, _AS_PROGRAM], ids=["python -m zds", "the zds program"])
def test_a_ctrl_c_while_zds_starts_is_exit_130_and_no_traceback(entry: str) -> None:
    """A Ctrl-C in the first milliseconds of any command (its modules loading, main's
    start-up before its try) was a KeyboardInterrupt traceback. ``zds netns list``: its
    start-up loads no protobuf (whose message classes a Ctrl-C may crash as they are made)."""
    said: list[str] = []
    for _ in range(60):
        argv = [sys.executable, "-c", entry, "netns", "list"]
        # (zds.cli loading, then main's start-up: ~20 ms)
        code, out = interrupted(argv, signal.SIGINT, random.uniform(0.001, 0.03), ready="ready\n")
        if code != 130 or "Traceback" in out:  # (what netns list printed before: its table)
            said.append(f"exit {code}: {out}")
    assert said == []
