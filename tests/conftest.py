"""Shared test fixtures.

Tests that need root carry ``@pytest.mark.root``. On a developer machine
without root they are skipped with a reason; with ``CI=true`` a missing
privilege is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.harness import ROOT, SHARED

__all__ = ["ROOT", "SHARED"]


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None or is_root():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("this test needs root, and CI=true turns the skip into a failure")
    pytest.skip("needs root (runs in CI as root)")


def open_fds() -> set[int]:
    """The fds this process has open now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fd_count(pid: int) -> int:
    """How many fds process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def zds_cmd() -> list[str]:
    """How to run the zds CLI from tests: this interpreter, this checkout."""
    return [sys.executable, "-m", "zds"]
