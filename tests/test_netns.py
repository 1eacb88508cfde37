"""zds.netns handles: open, validate, identify, enter and leave network namespaces.

Real namespaces only: a child process in its own netns (``unshare --net``) or
a named one made by ``create_netns``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import pytest

from tests.harness import async_wait_until, open_fds, wait_until
from zds.logs import JsonFormatter
from zds.netns import (
    NetnsError,
    NetnsHandle,
    NetnsIdentity,
    NetnsRef,
    NetnsRefError,
    current_netns,
    enter,
    in_netns,
    netns_cookie,
    netns_identity,
    open_netns,
    open_netns_pid,
    open_netns_ref,
    run_in_netns,
    validate_netns_fd,
)
from zds.netns.fixtures import create_netns, delete_netns

SELF_NETNS = "/proc/self/ns/net"

P = ParamSpec("P")
T = TypeVar("T")


def stat_identity(path: str) -> NetnsIdentity:
    st = os.stat(path)
    return NetnsIdentity(st.st_dev, st.st_ino)


def thread_identity() -> NetnsIdentity:
    """The calling thread's netns identity, read straight from /proc."""
    return stat_identity("/proc/thread-self/ns/net")


@pytest.fixture
def named_netns() -> Iterator[str]:
    """A fresh named netns; removed afterwards whatever the test did."""
    name = f"zdst-{secrets.token_hex(3)}"
    path = create_netns(name)
    try:
        yield path
    finally:
        delete_netns(name, missing_ok=True)


@pytest.fixture
def other_netns_pid() -> Iterator[int]:
    """A child process in a network namespace of its own."""
    child = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        mine = stat_identity(SELF_NETNS)
        wait_until(
            lambda: stat_identity(f"/proc/{child.pid}/ns/net") != mine, "unshare --net to switch namespace", 5
        )
        yield child.pid
    finally:
        child.kill()
        child.wait()


def process_state(pid: int) -> str:
    """The one-letter state of process ``pid`` (R, S, Z, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def dead_pid() -> int:
    """A pid that was used a moment ago and has been reaped since."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --- opening ---------------------------------------------------------------------


def test_open_by_path_reports_the_identity_os_stat_sees() -> None:
    with open_netns(SELF_NETNS) as handle:
        assert handle.path == SELF_NETNS
        assert handle.identity == stat_identity(SELF_NETNS)
        assert handle.identity == netns_identity(handle.fileno())
        assert str(handle.identity) == f"{handle.identity.dev}:{handle.identity.ino}"


def test_open_by_pid_and_by_pid_reference_give_our_own_netns() -> None:
    pid = os.getpid()
    with (
        open_netns_pid(pid) as by_pid,
        open_netns_ref(NetnsRef.parse(f"pid:{pid}")) as by_ref,
        current_netns() as current,
    ):
        assert by_pid.path == f"/proc/{pid}/ns/net"
        assert by_pid.identity == by_ref.identity == current.identity == stat_identity(SELF_NETNS)
        assert by_pid.fileno() != by_ref.fileno()


def test_path_reference_opens_that_path() -> None:
    with open_netns_ref(NetnsRef.of_path(SELF_NETNS)) as handle:
        assert handle.path == SELF_NETNS
        assert handle.identity == stat_identity(SELF_NETNS)


@pytest.mark.root
def test_bare_name_reference_means_a_named_netns(named_netns: str) -> None:
    with open_netns_ref(NetnsRef.parse(os.path.basename(named_netns))) as handle:
        assert handle.path == named_netns
        assert handle.identity == stat_identity(named_netns)


@pytest.mark.root
def test_another_process_netns_has_another_identity(other_netns_pid: int) -> None:
    with open_netns_pid(other_netns_pid) as other, current_netns() as mine:
        assert other.identity == stat_identity(f"/proc/{other_netns_pid}/ns/net")
        assert other.identity != mine.identity


@pytest.mark.root
def test_two_opens_of_one_netns_share_an_identity(named_netns: str) -> None:
    with open_netns(named_netns) as first, open_netns(named_netns) as second, current_netns() as mine:
        assert first.identity == second.identity == stat_identity(named_netns)
        assert first.identity != mine.identity


def test_missing_named_netns_says_how_to_create_it() -> None:
    with pytest.raises(NetnsError) as caught:
        open_netns("/var/run/netns/zdst-no-such-pod")
    assert str(caught.value) == (
        "cannot open netns /var/run/netns/zdst-no-such-pod: no such file;"
        ' create it with "zds netns create zdst-no-such-pod"'
    )


def test_missing_named_netns_of_a_name_netns_create_refuses_gets_no_such_advice() -> None:
    with pytest.raises(NetnsError) as caught:
        open_netns("/var/run/netns/zdst:no-such-pod")
    assert str(caught.value) == "cannot open netns /var/run/netns/zdst:no-such-pod: no such file"


def test_missing_path_elsewhere_says_no_such_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "nothing")
    with pytest.raises(NetnsError, match=f"^cannot open netns {path}: no such file$"):
        open_netns(path)


def test_regular_file_is_not_a_network_namespace(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "hostname")
    with open(path, "w") as f:
        f.write("pod-a\n")
    with pytest.raises(NetnsError) as caught:
        open_netns(path)
    assert str(caught.value) == f"{path} is not a network namespace"


def test_mount_namespace_is_not_a_network_namespace() -> None:
    with pytest.raises(NetnsError) as caught:
        open_netns("/proc/self/ns/mnt")
    assert str(caught.value) == "/proc/self/ns/mnt is a mnt namespace, not a network namespace"


def test_other_proc_files_are_not_network_namespaces() -> None:
    # Also on /proc (PROC_SUPER_MAGIC), so only the ioctl can refuse them.
    with pytest.raises(NetnsError, match="is not a network namespace"):
        open_netns("/proc/self/status")


def test_directory_is_not_a_network_namespace(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(NetnsError, match="is not a network namespace"):
        open_netns(str(tmp_path))


def test_fifo_is_refused_without_hanging(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "fifo")
    os.mkfifo(path)
    with pytest.raises(NetnsError, match="is not a network namespace"):
        open_netns(path)


def test_what_is_not_a_netns_is_never_opened(tmp_path: os.PathLike[str]) -> None:
    """A path that led to a device was opened as root (/dev/watchdog starts its timer on open,
    a tape rewinds): only an nsfs file is. Seen here on a FIFO: a writer waits in its open until
    a reader opens it, and stays waiting."""
    path = os.path.join(tmp_path, "fifo")
    os.mkfifo(path)
    opened = threading.Event()

    def writer() -> None:
        fd = os.open(path, os.O_WRONLY)  # until someone opens it for reading
        opened.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(NetnsError, match="is not a network namespace"):
            open_netns(path)
        assert not opened.wait(0.5), "the FIFO was opened"
    finally:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer go
        thread.join(10)


def test_dead_pid_does_not_exist() -> None:
    pid = dead_pid()
    with pytest.raises(NetnsError) as caught:
        open_netns_pid(pid)
    assert str(caught.value) == f"process {pid} does not exist"
    with pytest.raises(NetnsError) as caught:
        open_netns_ref(NetnsRef.parse(f"pid:{pid}"))
    assert str(caught.value) == f"process {pid} does not exist"


def test_zombie_has_no_network_namespace() -> None:
    child = subprocess.Popen(["true"])
    try:
        wait_until(lambda: process_state(child.pid) == "Z", "the child to exit (a zombie)", 5)
        with pytest.raises(NetnsError, match=f"process {child.pid} has exited"):
            open_netns_pid(child.pid)
    finally:
        child.wait()


def test_every_name_the_package_offers_is_there_when_asked_for() -> None:
    # zds.netns loads each name's module on first use: a name listed in __all__ but not
    # mapped to its module would fail only where it is first imported.
    code = (
        "import zds.netns as n; print(all(callable(getattr(n, name)) for name in n.__all__), bool(n.__all__))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["True", "True"]


def test_a_path_with_a_nul_byte_is_refused_in_one_line() -> None:
    with pytest.raises(NetnsError, match="has no NUL byte"):
        open_netns("/var/run\0/netns/pod")


@pytest.mark.parametrize("ref", ["", "pid:", "pid:x", "pid:0", "pid:-3"])
def test_bad_references_are_refused(ref: str) -> None:
    with pytest.raises(NetnsRefError, match="netns reference"):
        NetnsRef.parse(ref)


def test_a_reference_is_checked_however_it_is_made() -> None:
    """A NamedTuple: ``_make`` and ``_replace`` make one too, and check it as ``NetnsRef()`` does."""
    good = NetnsRef.of_path("/var/run/netns/pod")
    with pytest.raises(NetnsRefError, match="empty netns path"):
        good._replace(path=" ")
    with pytest.raises(NetnsRefError, match="exactly one of them"):
        good._replace(pid=7)
    with pytest.raises(NetnsRefError, match="exactly one of them"):
        NetnsRef._make([None, None])
    assert good._replace(path="/var/run/netns/b") == NetnsRef(path="/var/run/netns/b")


def test_a_reference_in_a_json_log_line_is_written_as_a_pods_file_writes_it() -> None:
    record = logging.LogRecord("zds.server", logging.INFO, __file__, 1, "pod enrolled", None, None)
    record.netns = NetnsRef.of_pid(42)  # (a tuple: json.dumps alone would write [null, 42])
    assert json.loads(JsonFormatter().format(record))["netns"] == "pid:42"


@pytest.mark.parametrize("pid", [0, -1, True])
def test_bad_pids_are_refused(pid: int) -> None:
    with pytest.raises(NetnsError, match="bad process id"):
        open_netns_pid(pid)


# --- validation and ownership ------------------------------------------------------------


def test_validate_accepts_a_netns_fd_and_refuses_others() -> None:
    with open_netns(SELF_NETNS) as handle:
        validate_netns_fd(handle.fileno())
    fd = os.open("/proc/self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(NetnsError, match=r"^uts-fd is a uts namespace, not a network namespace$"):
            validate_netns_fd(fd, "uts-fd")
    finally:
        os.close(fd)


def test_validate_a_closed_fd_says_so() -> None:
    fd = os.open(SELF_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    with pytest.raises(NetnsError, match=f"^fd {fd} is not an open file descriptor$"):
        validate_netns_fd(fd)


def test_validate_an_o_path_fd_says_it_is_one() -> None:
    """An O_PATH fd of a netns is open (fstat and fstatfs take it): "not an open file
    descriptor" misled; no ioctl or setns takes it."""
    fd = os.open(SELF_NETNS, os.O_PATH | os.O_CLOEXEC)
    try:
        with pytest.raises(NetnsError, match=r"^pod-fd was opened with O_PATH: setns cannot enter it"):
            validate_netns_fd(fd, "pod-fd")
    finally:
        os.close(fd)


def test_from_fd_takes_ownership_and_closes_on_validation_failure() -> None:
    fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    with pytest.raises(NetnsError, match="mnt namespace"):
        NetnsHandle.from_fd(fd, "/proc/self/ns/mnt")
    with pytest.raises(OSError):
        os.fstat(fd)


def test_from_fd_without_validation_keeps_any_fd() -> None:
    fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    handle = NetnsHandle.from_fd(fd, validate=False)
    assert handle.fileno() == fd
    assert handle.identity == stat_identity("/proc/self/ns/mnt")
    handle.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_close_is_idempotent_and_a_closed_handle_refuses_use() -> None:
    handle = open_netns(SELF_NETNS)
    fd = handle.fileno()
    assert not handle.closed
    handle.close()
    handle.close()
    assert handle.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(NetnsError, match="is closed"):
        handle.fileno()
    with pytest.raises(NetnsError, match="is closed"):
        handle.dup()


def test_context_manager_closes() -> None:
    with open_netns(SELF_NETNS) as handle:
        fd = handle.fileno()
    assert handle.closed
    with pytest.raises(OSError):
        os.fstat(fd)


def test_dup_is_an_independent_cloexec_fd_of_the_same_netns() -> None:
    with open_netns(SELF_NETNS) as handle:
        copy = handle.dup()
    try:
        assert copy != handle.fd
        assert not os.get_inheritable(copy)
        assert netns_identity(copy) == stat_identity(SELF_NETNS)
        validate_netns_fd(copy)  # still open after the handle closed
    finally:
        os.close(copy)


def test_handles_are_close_on_exec() -> None:
    with open_netns(SELF_NETNS) as handle:
        assert not os.get_inheritable(handle.fileno())


def test_opening_and_failing_leaks_no_fd() -> None:
    before = open_fds()
    for _ in range(20):
        with open_netns(SELF_NETNS), open_netns_pid(os.getpid()), current_netns():
            pass
        for bad in ("/proc/self/ns/mnt", "/proc/self/status", "/var/run/netns/zdst-none"):
            with pytest.raises(NetnsError):
                open_netns(bad)
    assert open_fds() == before


# --- entering and leaving ------------------------------------------------------------------


@pytest.mark.root
def test_in_netns_switches_the_thread_and_comes_back(named_netns: str) -> None:
    outside = thread_identity()
    host_links = socket.if_nameindex()
    assert len(host_links) > 1  # the host has more than loopback, so the lists below differ
    with open_netns(named_netns) as target:
        assert target.identity != outside
        with in_netns(target):
            assert thread_identity() == target.identity
            # A fresh netns has nothing but loopback.
            assert [name for _, name in socket.if_nameindex()] == ["lo"]
        assert thread_identity() == outside
        assert socket.if_nameindex() == host_links


@pytest.mark.root
def test_in_netns_accepts_a_plain_fd(named_netns: str) -> None:
    outside = thread_identity()
    with open_netns(named_netns) as target, in_netns(target.fileno()):
        assert thread_identity() == target.identity
    assert thread_identity() == outside


@pytest.mark.root
def test_in_netns_comes_back_when_the_body_raises(named_netns: str) -> None:
    outside = thread_identity()
    with open_netns(named_netns) as target, pytest.raises(RuntimeError, match="boom"), in_netns(target):
        assert thread_identity() == target.identity
        raise RuntimeError("boom")
    assert thread_identity() == outside


@pytest.mark.root
def test_in_netns_nests(named_netns: str, other_netns_pid: int) -> None:
    outside = thread_identity()
    with open_netns(named_netns) as first, open_netns_pid(other_netns_pid) as second, in_netns(first):
        with in_netns(second):
            assert thread_identity() == second.identity
        assert thread_identity() == first.identity
    assert thread_identity() == outside


@pytest.mark.root
def test_in_netns_moves_only_the_calling_thread(named_netns: str) -> None:
    outside = thread_identity()
    seen: list[NetnsIdentity] = []
    entered, checked = threading.Event(), threading.Event()

    def other_thread() -> None:
        entered.wait(5)
        seen.append(thread_identity())
        checked.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with open_netns(named_netns) as target, in_netns(target):
        entered.set()
        assert checked.wait(5)
    worker.join()
    assert seen == [outside]


@pytest.mark.root
def test_in_netns_refuses_a_namespace_of_another_kind() -> None:
    outside = thread_identity()
    fd = os.open("/proc/self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(NetnsError, match=f"cannot enter netns fd {fd}"), in_netns(fd):
            pytest.fail("the body must not run")
    finally:
        os.close(fd)
    assert thread_identity() == outside


@pytest.mark.root
def test_sockets_made_inside_keep_their_netns(named_netns: str) -> None:
    with open_netns(named_netns) as target, in_netns(target):
        listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        port = listener.getsockname()[1]
        # From the host's loopback the port is not there ...
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        # ... from inside the namespace it is, although the listener is served from here.
        with open_netns(named_netns) as target, in_netns(target):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
        with client, listener.accept()[0] as server:
            client.sendall(b"ping")
            assert server.recv(4) == b"ping"


@pytest.mark.root
def test_in_netns_leaks_no_fd(named_netns: str) -> None:
    before = open_fds()
    with open_netns(named_netns) as target:
        for _ in range(50):
            with in_netns(target):
                pass
        with pytest.raises(ValueError), in_netns(target):
            raise ValueError
    assert open_fds() == before


def _socket_cookie_inside(target: NetnsHandle) -> int:
    """The netns cookie as a socket made inside reports it (the definition of the cookie)."""
    with in_netns(target):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with probe:
        return int.from_bytes(probe.getsockopt(socket.SOL_SOCKET, enter.SO_NETNS_COOKIE, 8), sys.byteorder)


@pytest.mark.root
def test_netns_cookie_is_what_a_socket_inside_reports_however_it_is_read(
    named_netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(enter._CookieWay, "id_is_cookie", None)  # this process decides afresh
    with open_netns(named_netns) as target, open_netns(SELF_NETNS) as own:
        expected = _socket_cookie_inside(target)
        assert netns_cookie(target) == expected  # the first read decides how the next are read
        assert netns_cookie(target) == expected
        assert netns_cookie(own) == _socket_cookie_inside(own) != expected
    try:
        with open_netns(SELF_NETNS) as own:
            fcntl.ioctl(own.fileno(), enter.NS_GET_ID, bytes(8))
    except OSError:  # a kernel before 6.18: the socket's way stays
        assert enter._CookieWay.id_is_cookie is False
    else:
        assert enter._CookieWay.id_is_cookie is True


@pytest.mark.root
def test_netns_cookie_of_an_fd_that_is_no_network_namespace_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enter._CookieWay, "id_is_cookie", True)  # NS_GET_ID would answer for any namespace
    fd = os.open("/proc/self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert netns_cookie(fd) is None
    finally:
        os.close(fd)


@pytest.mark.root
def test_failed_way_back_aborts_the_process() -> None:
    # Staying in the wrong namespace is worse than dying: prove it dies, in a child.
    code = textwrap.dedent(
        """
        from zds.netns import enter, handle
        real = enter.setns
        calls = []
        def setns_once(fd):
            calls.append(fd)
            if len(calls) > 1:
                raise OSError(1, "Operation not permitted")
            real(fd)
        enter.setns = setns_once
        with handle.current_netns() as mine, enter.in_netns(mine):
            pass
        print("still alive")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == -signal.SIGABRT
    assert "still alive" not in result.stdout
    assert "cannot return to the original network namespace" in result.stderr


# --- asyncio ---------------------------------------------------------------------------------


@pytest.mark.root
async def test_run_in_netns_runs_the_function_inside(named_netns: str) -> None:
    loop_thread = thread_identity()
    with open_netns(named_netns) as target:
        inside = await run_in_netns(target, thread_identity)
        names = await run_in_netns(target.fileno(), lambda: [n for _, n in socket.if_nameindex()])
        assert inside == target.identity
    assert names == ["lo"]
    assert thread_identity() == loop_thread


@pytest.mark.root
async def test_run_in_netns_passes_arguments_and_errors(named_netns: str) -> None:
    def fail(message: str) -> None:
        raise LookupError(message)

    with open_netns(named_netns) as target:
        assert await run_in_netns(target, divmod, 7, 2) == (3, 1)
        with pytest.raises(LookupError, match="nope"):
            await run_in_netns(target, fail, "nope")


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that counts the work submitted to it."""

    submitted = 0

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        future = super().submit(fn, *args, **kwargs)
        self.submitted += 1
        return future


@pytest.mark.root
async def test_run_in_netns_survives_closing_the_handle_before_the_worker_starts(named_netns: str) -> None:
    loop = asyncio.get_running_loop()
    # One worker, kept busy: the call below waits in the queue while its handle is closed.
    pool = CountingExecutor(max_workers=1)
    loop.set_default_executor(pool)
    gate = threading.Event()
    busy = loop.run_in_executor(None, gate.wait, 5)
    target = open_netns(named_netns)
    identity = target.identity
    call = asyncio.ensure_future(run_in_netns(target, thread_identity))
    # run_in_netns dups the fd, then queues the work: once it is queued, the dup is taken.
    await async_wait_until(lambda: pool.submitted == 2, "run_in_netns to queue its work")
    target.close()
    gate.set()
    await busy
    assert await call == identity


@pytest.mark.root
async def test_run_in_netns_leaks_no_fd(named_netns: str) -> None:
    before = open_fds()
    for _ in range(10):
        with open_netns(named_netns) as target:
            assert await run_in_netns(target, thread_identity) == target.identity
    with open_netns(named_netns) as target, pytest.raises(ZeroDivisionError):
        await run_in_netns(target, divmod, 1, 0)
    assert open_fds() == before


@pytest.mark.root
async def test_a_cancelled_run_in_netns_returns_once_its_work_never_ran_or_has_finished(
    named_netns: str,
) -> None:
    """A worker thread cannot be stopped half-way: cancelled while its work runs, the call
    waits for the work to finish (so a caller can take out what it put in, after it, not
    beside it); cancelled while queued, the work never runs and its fd is closed."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def slow() -> None:
        started.set()
        release.wait(10)
        ran.append("slow")

    before = open_fds()
    try:
        with open_netns(named_netns) as target:
            running = asyncio.ensure_future(run_in_netns(target, slow, executor=pool))
            queued = asyncio.ensure_future(run_in_netns(target, ran.append, "queued", executor=pool))
            await async_wait_until(started.is_set, "the first call's work running")
            running.cancel()
            queued.cancel()
            # Both cancels are delivered in one turn of the loop, the running call's first: once
            # the queued call has ended, the running one has had its cancel too.
            await async_wait_until(queued.done, "the queued call's cancel delivered")
            assert not running.done(), "it returned while its work still ran"
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await running
            assert ran == ["slow"]
            with pytest.raises(asyncio.CancelledError):
                await queued
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert ran == ["slow"], "the queued work ran after all"
    assert open_fds() == before
