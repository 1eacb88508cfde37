"""The node agent's own tasks: one owner, so nothing it starts outlives it or goes unread."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from zds.aio import cancel_and_wait

T = TypeVar("T")


def retrieve_exception(task: asyncio.Future[Any]) -> None:
    """Read a finished task's or future's outcome, so that an exception nobody awaited is not
    logged as 'never retrieved' (an owned task whose caller gave up, a snapshot entry's answer)."""
    if not task.cancelled():
        task.exception()


class TaskOwner:
    """Keeps every task it spawns until it is done, cancels them all at shutdown,
    and always reads their outcome."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(retrieve_exception)
        return task

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` as an owned task and wait for it. A caller that gives up (a gRPC
        deadline, a cancelled client) stops waiting; the task still completes."""
        return await asyncio.shield(self.spawn(coro))

    async def cancel_all(self) -> None:
        """Cancel every task, also those a cancelled one spawned on its way out."""
        while pending := [task for task in self._tasks if not task.done()]:
            for task in pending:
                await cancel_and_wait(task)
