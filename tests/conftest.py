"""Shared test fixtures (the helpers they use live in ``tests/harness.py``).

Tests that need root carry ``@pytest.mark.root``. On a developer machine
without root they are skipped with a reason; with ``CI=true`` a missing
privilege is a failure, never a silent skip.
"""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.harness import (
    ZDS,
    Namespaces,
    NodeAgentProc,
    Pod,
    StartServer,
    is_root,
    release_pod_netns,
    run_all,
    skip_outside_ci,
)
from tests.standins import Peers
from zds import defaults
from zds.netns.fixtures import create_netns, delete_netns


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None or is_root():
        return
    skip_outside_ci("this test needs root (runs in CI as root)")


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_children() -> None:
    """A suite started in the background of a shell without job control (``./dev test &``)
    inherits SIGINT ignored, and so would every command a test starts: the Ctrl-C tests
    would then see it ignored. Take SIGINT back, so children start with its default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def machine_state_untouched() -> Iterator[None]:
    """No test may use the machine's own pod store (zds server's default --state-dir):
    every node agent a test starts keeps its state under the test's tmp dir."""
    existed = os.path.exists(defaults.STATE_DIR)
    yield
    release_pod_netns()
    if not existed and os.path.exists(defaults.STATE_DIR):
        pytest.fail(f"a test started a node agent on the machine's {defaults.STATE_DIR}; give it --state-dir")


@pytest.fixture
def zds_cmd() -> list[str]:
    """How to run the zds CLI from tests: this interpreter, this checkout."""
    return list(ZDS)


@pytest.fixture
def start_server(tmp_path: pathlib.Path) -> Iterator[StartServer]:
    """Start ``zds server`` processes (sockets under tmp_path, no redirection rules);
    each is stopped at the end."""
    started: list[NodeAgentProc] = []

    def start(*extra: str, name: str = "server", ready: bool = True) -> NodeAgentProc:
        proc = NodeAgentProc(str(tmp_path), *extra, name=name)
        started.append(proc)
        return proc.wait_ready() if ready else proc

    yield start
    run_all([proc.stop for proc in started], "start_server")


@pytest.fixture
def server(start_server: StartServer) -> NodeAgentProc:
    """A ready ``zds server`` with the default flags (a module may override this fixture)."""
    return start_server()


@pytest.fixture
def peers() -> Iterator[Peers]:
    """ztunnel stand-ins, all closed at the end."""
    opened = Peers()
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def make_pod() -> Iterator[Callable[[], Pod]]:
    """Make named test namespaces standing in for pods; all deleted at the end."""
    made: list[str] = []

    def make() -> Pod:
        name = f"zdst-{uuid.uuid4().hex[:10]}"
        path = create_netns(name)
        made.append(name)
        return Pod(name, path)

    yield make
    run_all([functools.partial(delete_netns, name, missing_ok=True) for name in made], "make_pod")


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    made = Namespaces()
    try:
        yield made
    finally:
        made.close()
