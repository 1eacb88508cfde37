"""One asyncio lock per key (a uid, a network namespace), kept only while someone holds
it or waits for it: a node that sees thousands of pods come and go keeps no lock for
those that are gone."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class KeyedLocks(Generic[K]):
    def __init__(self) -> None:
        #: key -> (its lock, how many hold it or wait for it)
        self._locks: dict[K, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def __contains__(self, key: object) -> bool:
        """Someone holds the lock of ``key`` or waits for it."""
        return key in self._locks

    def hold(self, key: K) -> _Held[K]:
        """``async with`` it to hold the lock of ``key``; one holder at a time per key, in the
        order they came."""
        return _Held(self._locks, key)


class _Held(Generic[K]):
    """One hold of a key's lock (a class, not a generator-based context manager: every
    enrollment takes one, and this is ~4x cheaper)."""

    __slots__ = ("_key", "_lock", "_locks")

    def __init__(self, locks: dict[K, tuple[asyncio.Lock, int]], key: K) -> None:
        self._locks = locks
        self._key = key
        self._lock: asyncio.Lock | None = None

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._key) or (asyncio.Lock(), 0)
        self._locks[self._key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise
        self._lock = lock

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._lock is not None
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        lock, users = self._locks[self._key]
        if users == 1:
            del self._locks[self._key]
        else:
            self._locks[self._key] = (lock, users - 1)
