"""asyncio helpers both ends and ``zds check`` share."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


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
