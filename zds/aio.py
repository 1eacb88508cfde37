"""asyncio helpers the node agent and ``zds check`` share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for it to end, its cancellation (or error) swallowed, but not
    the caller's own: a caller cancelled while it waits here is cancelled still. (A
    ``suppress(CancelledError)`` around the wait swallowed that too, and a stop asked for
    right then went unheard: ``zds check`` ran on after Ctrl-C or SIGTERM.)"""
    task.cancel()
    current = asyncio.current_task()
    before = current.cancelling() if current is not None else 0
    try:
        with contextlib.suppress(Exception):
            await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > before:
            raise


async def finished_within(aw: Awaitable[Any], within: float) -> bool:
    """Wait up to ``within`` seconds for ``aw``; False (it is cancelled) if it did not finish.
    For a clean-up that runs after its task was cancelled: there, Python 3.11's
    ``asyncio.timeout`` raises CancelledError instead of TimeoutError when the time is up
    (it counts the earlier cancel as its own), which skipped the rest of the clean-up."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=within)
    except BaseException:  # cancelled while waiting: what it waited for goes too
        task.cancel()
        raise
    if task in done:
        with contextlib.suppress(Exception):
            task.result()  # (retrieved: its error is the caller's to find some other way)
        return True
    await cancel_and_wait(task)
    return False


class Cancelled:
    """Whether a cancel came while ``to_its_end`` waited."""

    seen = False


async def to_its_end(aw: Awaitable[T], cancelled: Cancelled) -> T:
    """``aw`` to its end even if the caller is cancelled meanwhile, for work that, cut short,
    leaves things worse than done or not begun (bounded by ``aw`` itself); ``cancelled.seen``
    says a cancel came: the caller, once it recorded the outcome (a result or an error),
    raises CancelledError itself. A second cancel is passed on to ``aw``."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.cancelled():
            raise  # (cancelled itself, not by the caller's cancel)
        cancelled.seen = True
        return await task  # (done already, or soon; its error, if any, is the caller's)
