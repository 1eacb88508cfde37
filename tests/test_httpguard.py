"""The TCP HTTP endpoints' guard says what it does to many connections in few lines, and
loses no count."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.harness import async_wait_until
from zds.logs import Tally


async def test_a_tally_says_the_first_at_once_and_the_rest_when_its_window_is_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="zds.http")
    # (a window of 1 s: a poll that saw the second line later than the window, on a loaded
    # machine, would find the next add said at once)
    tally = Tally(every=1.0, logger=logging.getLogger("zds.http"))
    for open_now in range(5):
        tally.add("HTTP: %d connection(s) refused: %d open already", open_now)
    assert [r.getMessage() for r in caplog.records] == ["HTTP: 1 connection(s) refused: 0 open already"]
    # The other four: said once the window is up (they were lost until one more came later).
    await async_wait_until(lambda: len(caplog.records) == 2, "the rest said", timeout=5)
    assert caplog.records[1].getMessage() == "HTTP: 4 connection(s) refused: 4 open already"
    tally.add("HTTP: %d connection(s) refused: %d open already", 9)  # (a line went just now: later)
    assert len(caplog.records) == 2
    await async_wait_until(lambda: len(caplog.records) == 3, "the next one said", timeout=5)
    assert caplog.records[2].getMessage() == "HTTP: 1 connection(s) refused: 9 open already"


async def test_a_tally_flushed_says_what_it_holds_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="zds.http")
    tally = Tally(every=60, logger=logging.getLogger("zds.http"))
    tally.flush()  # nothing counted: nothing said
    for open_now in range(3):
        tally.add("HTTP: %d connection(s) refused: %d open already", open_now)
    tally.flush()  # (a stop: the 60 s are not waited for)
    tally.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "HTTP: 1 connection(s) refused: 0 open already",
        "HTTP: 2 connection(s) refused: 2 open already",
    ]


async def test_a_tally_said_by_an_add_after_its_time_says_no_line_of_0_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An add that came once the seconds were up (the loop busy: its timer late) said the
    count at once, and the timer said it again as 0 when it came (with the latest before)."""
    caplog.set_level(logging.WARNING, logger="zds.http")
    # (a window of 0.5 s: the process stalled as long between the first two adds, on a loaded
    # machine, would say the second at once)
    tally = Tally(every=0.5, logger=logging.getLogger("zds.http"))
    tally.add("%d happened (the latest: %s)", "a")  # said at once
    tally.add("%d happened (the latest: %s)", "b")  # the timer is armed
    time.sleep(1.0)  # noqa: ASYNC251 (the point: the loop kept busy, the timer late)
    tally.add("%d happened (the latest: %s)", "c")  # the seconds are up: said at once
    await asyncio.sleep(1.0)  # the late timer's time
    assert [r.getMessage() for r in caplog.records] == [
        "1 happened (the latest: a)",
        "2 happened (the latest: c)",
    ]
