"""zds.aio: waits that a clean-up can rely on, also after its task was cancelled."""

from __future__ import annotations

import asyncio
import inspect

from tests.harness import async_wait_until
from zds.aio import finished_within


async def test_a_clean_up_after_a_cancel_gets_its_bounded_wait_and_goes_on() -> None:
    # On Python 3.11, asyncio.timeout in such a clean-up raised CancelledError when the time
    # was up (not TimeoutError): zds check skipped the SIGKILL of a ztunnel that ignored SIGTERM.
    steps: list[str] = []
    waiting = asyncio.Event()

    async def check() -> None:
        try:
            waiting.set()
            await asyncio.sleep(30)
        finally:
            never = asyncio.get_running_loop().create_future()
            steps.append(f"waited: {await finished_within(never, 0.05)}")
            steps.append("killed")
            assert never.cancelled()

    task = asyncio.create_task(check())
    await waiting.wait()  # (it set it on its way to its await: it is there now)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert steps == ["waited: False", "killed"]
    assert task.cancelled()


async def test_what_finishes_in_time_is_said_so() -> None:
    assert await finished_within(asyncio.sleep(0), 5) is True


async def test_a_caller_cancelled_while_it_waits_takes_what_it_waited_for_along() -> None:
    inner = asyncio.ensure_future(asyncio.sleep(30))
    call = finished_within(inner, 30)
    waiting = asyncio.create_task(call)
    await async_wait_until(  # (its first await is the one on inner)
        lambda: inspect.getcoroutinestate(call) == inspect.CORO_SUSPENDED, "the call waiting for inner"
    )
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await asyncio.sleep(0)
    assert waiting.cancelled() and inner.cancelled()
