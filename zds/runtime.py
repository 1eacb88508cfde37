"""What every command shares at start-up and stop: the event loop, privilege checks, the
stop signals and interrupts, fd limits and the fd table, logging, and what is put off until
after the first work (its stdout: ``zds.output``)."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import sys
from collections.abc import Coroutine, Iterator
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

# Bits of /proc/self/status CapEff (linux/capability.h).
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21}


#: Modules that importing protobuf loads and that zds does not use with protobuf's default
#: (upb) implementation: its pure-Python message classes (``descriptor_pool`` and ``builder``
#: import them whatever the implementation; with them come text_format, the decoder and the
#: well-known types). ~8 ms of every command that speaks protobuf (A/B here).
UNUSED_AT_START = ("google.protobuf.internal.python_message",)


def starting() -> None:
    """A command starts: no garbage collection until ``started``. Start-up (imports, the
    parsers, a pods file) allocates much and frees little, and the collector would scan it
    all again and again: ~7 ms of ``zds ztunnel``'s ~100 ms to its hello (A/B here).
    The modules of ``UNUSED_AT_START`` are loaded only if something uses them."""
    gc.disable()
    for name in UNUSED_AT_START:
        defer_import(name)


def defer_import(name: str) -> None:
    """Import ``name`` now but run it only when one of its attributes is first used
    (``importlib.util.LazyLoader``); nothing if it is loaded already or cannot be found.
    ``from parent import child`` does not run it; ``import parent.child`` does (the import
    system looks into the module), and so does anything that reads from it."""
    if name in sys.modules:
        return
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return
    if spec is None or spec.loader is None:
        return
    try:
        spec.loader = importlib.util.LazyLoader(spec.loader)
    except TypeError:  # a loader that can only load at once
        return
    parent, _, child = name.rpartition(".")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    # As the import system does for a submodule. It also keeps ``from parent import child``
    # from looking into the module (its __spec__), which would run it.
    if parent:
        setattr(sys.modules[parent], child, module)


_stop_signals: tuple[signal.Signals, ...] | None = None


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops a zds command the way Ctrl-C does, with its clean-up: also SIGHUP (the
    terminal or ssh session it ran in went away), which killed it where it stood, unless the
    process was started with SIGHUP ignored (``nohup``): that stays so. Decided once."""
    global _stop_signals
    if _stop_signals is None:
        hup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
        _stop_signals = (signal.SIGINT, signal.SIGTERM, *hup)
    return _stop_signals


def ensure_std_fds() -> None:
    """fds 0, 1 and 2 open (on /dev/null where a caller closed them): else the first file or
    socket opened takes the number, and output, log lines (or libuv's own checks, which abort
    the process) go to it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 (None: Python found it closed)


#: Set by a parent (``zds demo``) for its children: its pid, which they end with.
PARENT_PID_ENV = "ZDS_PARENT_PID"
#: The largest pid Linux gives (2**22, include/linux/threads.h).
PID_MAX_LIMIT = 4_194_304


def no_grpc_at_fork(*, quiet: bool = True) -> None:
    """gRPC's fork support off (and, ``quiet``, its core's logging) before gRPC is loaded: zds never uses
    gRPC in a child. With it on, a fork (CPython forks when vfork fails, as it did on a loaded machine) ran gRPC's fork
    handlers in the rule worker's thread inside the pod's netns: gRPC's threads were started
    there for good (the netns held after its pod and name were gone), and the forked
    ``iptables-save`` ran gRPC's event engine and died (SIGSEGV, SIGABRT)."""
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
    if quiet:
        # A client's: gRPC core's own log lines (a TLS handshake that failed: "I1205 ...
        # Handshake failed ...") went to stderr before zds's one line that says it too
        # (GRPC_VERBOSITY given still counts; the node agent keeps them: its only report).
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


@functools.cache
def killed_with_parent() -> list[str]:
    """What to run a child that must not outlive the node agent with: util-linux's ``setpriv
    --pdeathsig KILL --`` (SIGKILL once the thread that started it is gone; ``subprocess.run``
    waits in that thread, so it lives as long as the child). An ``iptables-restore`` that
    outlived a SIGKILLed node agent committed after the next one had recovered: rules no pod
    store row records, or taken out of an acked pod. Not a ``preexec_fn``: that forks the whole
    process, gRPC's threads and all (its children crashed). [] where there is no setpriv."""
    import shutil

    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def follow_parent() -> None:
    """A child of ``zds demo`` is sent SIGTERM when the demo dies, also by SIGKILL (which it
    cannot pass on): else its node agent and ztunnel side served on, with their namespaces
    and rules, until someone found them. A parent already gone: SIGTERM now."""
    parent = os.environ.pop(PARENT_PID_ENV, "")
    # ("²" is a digit int() cannot read; past Linux's PID_MAX_LIMIT os.kill overflows)
    if not (parent.isascii() and parent.isdigit() and 0 < int(parent) <= PID_MAX_LIMIT):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        return  # (not Linux's prctl: nothing to follow with)
    if os.getppid() != int(parent) and not _alive(int(parent)):  # it died before the prctl
        # (said: a stale value in a shell's environment ended every command with no word)
        with contextlib.suppress(OSError):  # (a stderr gone: the ending all the same)
            print(f"zds: {PARENT_PID_ENV}={parent}: the parent it names is gone; ending", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)


def proc_stat(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the process's name (its state first: proc(5)'s
    field 3 on); None if there is no such process. Read as bytes: the name is any bytes the
    process set (one that is not UTF-8 made a text read fail)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()
    except OSError:
        return None


def process_group(pgid: int) -> list[int]:
    """The live processes of group ``pgid`` (a zombie is not: it waits for a parent to reap it)."""
    group = str(pgid).encode()
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit()
        and (fields := proc_stat(entry))
        and fields[2:3] == [group]
        and fields[0] not in (b"Z", b"X")
    ]


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot): with its pid, what tells it from
    a later process given the same pid. None if there is none (or only its zombie, which its
    parent has not reaped yet)."""
    fields = proc_stat(pid)
    try:
        return None if not fields or fields[0] == b"Z" else int(fields[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` is there (a parent run through a wrapper that forks is not the
    direct one, and was taken for dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_process(code: int) -> NoReturn:
    """A daemon stopped: end the process with ``code``, the stop signals ignored from here.
    Set over the loop's own handlers: removing those put the default back, and with signals
    still coming (a second Ctrl-C, a supervisor repeating its SIGTERM) one met it: killed by
    the signal, the last lines lost (25 of 25 runs of ``zds ztunnel`` under a signal every
    2 ms); the loop's close would put it back too. (Blocking them would not do: the other
    threads, the log writer's and gRPC's, would take them.) The log lines waiting for the
    writer thread and stdout go out first, as atexit would have them."""
    import logging

    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class Stopped(KeyboardInterrupt):
    """A stop signal taken as Ctrl-C (``Interrupts``): which one. The command exits 128 + it, as
    a shell reports a process the signal killed (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)  # (the number: copy and pickle make it again from its args)
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def how_stopped(exc: KeyboardInterrupt) -> str:
    """How a command says it was stopped: "interrupted" (Ctrl-C), or "stopped by SIGTERM"."""
    return f"stopped by {exc}" if isinstance(exc, Stopped) and exc.signum != signal.SIGINT else "interrupted"


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the command (SIGINT for a plain KeyboardInterrupt)."""
    return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)


class Interrupts:
    """SIGINT, SIGTERM and SIGHUP as KeyboardInterrupt (``Stopped``), for a command that cleans up on Ctrl-C (the
    demo, ``zds netns``): SIGTERM had killed it where it stood. In ``held()`` sections (starting
    a child and noting it; the clean-up) an interrupt waits for the section's end, then is
    raised. An interrupt raised where Python swallows exceptions (a ``__del__``, which the
    collector runs anywhere: pyroute2's event loops; logging's at-fork hook, when pyroute2
    forks) is not printed ("Exception ignored in ...") but raised again at the next section's
    end, at ``check()``, or as the ``with`` ends."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._held = 0
        self._pending = False
        self.interrupted = False
        #: The first stop signal that came (what the command's exit code says).
        self.signum = signal.SIGINT.value
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        global _interrupts
        for sig in stop_signals():
            self._old[sig] = signal.signal(sig, self._handler)
        self._old_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        _interrupts = self
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        global _interrupts
        _interrupts = None
        sys.unraisablehook = self._old_hook
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if exc_type is None and self._pending:  # (one swallowed since: see the class)
            raise Stopped(self.signum)

    def _unraisable(self, unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.exc_value, Stopped) and os.getpid() == self._pid:
            self._pending = True
            return
        self._old_hook(unraisable)

    def _handler(self, signum: int, frame: object) -> None:
        if in_forked_child(self._pid, signum):  # a forked helper must not run the command's clean-up
            return
        if not self.interrupted:
            self.signum = signum
        self.interrupted = True
        if self._held:
            self._pending = True
            return
        raise Stopped(self.signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held and self._pending:
                self._pending = False
                raise Stopped(self.signum)

    def check(self) -> None:
        if self.interrupted and not self._held:  # (a held section raises at its end)
            self._pending = False  # (raised here: not again at a later section's end)
            raise Stopped(self.signum)


def in_forked_child(pid: int, signum: int) -> bool:
    """For a signal handler installed by process ``pid``: False in that process; in a child
    forked from it without exec (pyroute2 making a netns), the child dies of ``signum`` as it
    would have without the handler, which must not act for the parent there."""
    if os.getpid() == pid:
        return False
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return True


#: The ``Interrupts`` in effect, if any.
_interrupts: Interrupts | None = None


def interrupts_held() -> contextlib.AbstractContextManager[None]:
    """The current ``Interrupts``' ``held()`` (nothing without one)."""
    return _interrupts.held() if _interrupts is not None else contextlib.nullcontext()


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if an interrupt came and was swallowed (see ``Interrupts``)."""
    if _interrupts is not None:
        _interrupts.check()


def started() -> None:
    """Start-up is over (the node agent is ready, the ztunnel side has its first snapshot or
    gave up waiting for it, a client's pods are read): what it made is kept out of every
    later collection (``gc.freeze``: a daemon's collections then scan only what it made
    since), and collection resumes."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


#: The log level and format of a command that configures logging only once something may
#: log (``configure_logs(later=True)``), until then; None otherwise.
_logs_later: tuple[str, str] | None = None


def configure_logs(level: str, fmt: str, *, later: bool = False) -> None:
    """Configure logging (``zds.logs.configure``): now, or (``later``) when ``logs_needed``
    is first called. A command whose own work logs nothing (``zds pod add`` over the bulk
    lane prints its answers) would load ``logging`` for nothing, ~4 ms of its start (A/B
    here). Settings left for later by an earlier command in this process are replaced."""
    global _logs_later
    _logs_later = (level, fmt)
    if not later:
        logs_needed()


def logs_needed() -> None:
    """Something that logs is about to be loaded (gRPC): configure logging now, if it was
    left for later."""
    global _logs_later
    if _logs_later is not None:
        from zds import logs

        level, fmt = _logs_later
        _logs_later = None
        logs.configure(level, fmt)


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` on uvloop when it is installed and wanted, else on asyncio's loop.
    (``main`` calls ``started`` when its start-up is over.)"""
    import asyncio  # here, not at the top: building the CLI parser must stay cheap

    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)


def missing_capabilities(needed: tuple[str, ...] = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN")) -> list[str]:
    """The capabilities in ``needed`` this process does not have."""
    effective = 0
    try:
        with open("/proc/self/status", "rb") as status:  # (its Name: is any bytes the program's name is)
            for line in status:
                if line.startswith(b"CapEff:"):
                    effective = int(line.split()[1], 16)
    except OSError:
        return list(needed)
    return [name for name in needed if not effective & (1 << CAPABILITIES[name])]


def privilege_error(command: str, needed: tuple[str, ...] = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN")) -> str | None:
    """A one-line error naming the missing capabilities, or None when all are there."""
    missing = missing_capabilities(needed)
    if not missing:
        return None
    return f"zds {command}: needs root or {' + '.join(needed)}; missing {', '.join(missing)}"
