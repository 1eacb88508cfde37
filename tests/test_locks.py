"""KeyedLocks: one holder at a time per key, and no lock kept for a key nobody uses
(a node sees thousands of network namespaces and uids come and go)."""

from __future__ import annotations

import asyncio

import pytest

from zds.server.locks import KeyedLocks


async def test_holders_of_one_key_take_turns_in_order_and_other_keys_do_not_wait() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def hold(key: str, name: str, until: asyncio.Event | None = None) -> None:
        async with locks.hold(key):
            order.append(f"{name} in")
            if until is not None:
                await until.wait()
            order.append(f"{name} out")

    first = asyncio.create_task(hold("a", "first", release))
    await asyncio.sleep(0)
    second = asyncio.create_task(hold("a", "second"))
    other = asyncio.create_task(hold("b", "other"))
    await other
    assert order == ["first in", "other in", "other out"]
    assert len(locks) == 1  # "a": held and waited for; "b" gone
    release.set()
    await asyncio.gather(first, second)
    assert order[3:] == ["first out", "second in", "second out"]
    assert len(locks) == 0


async def test_a_waiter_that_gives_up_leaves_no_lock_behind() -> None:
    locks: KeyedLocks[int] = KeyedLocks()
    holding, release = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with locks.hold(1):
            holding.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await holding.wait()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            async with locks.hold(1):
                pytest.fail("the lock was held by another")
    assert len(locks) == 1
    release.set()
    await task
    assert len(locks) == 0


async def test_an_error_inside_releases_the_key() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    with pytest.raises(ValueError):
        async with locks.hold("a"):
            raise ValueError("boom")
    assert len(locks) == 0
    async with asyncio.timeout(1):
        async with locks.hold("a"):
            assert len(locks) == 1
