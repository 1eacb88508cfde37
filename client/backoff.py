"""Reconnect backoff: exponential, capped, with jitter; no clock inside.

Between failed connects to the node agent zds waits from 10 ms (DESIGN.md), doubling up
to 15 s; ztunnel doubles before its first sleep, 20, 40 ms ... 15 s, without jitter
(``workloadmanager.rs``; README, Where zds differs). Jitter keeps many ztunnel sides (or
restarts) from reconnecting in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from zds import defaults


class Backoff:
    """Delays ``initial * factor**n`` capped at ``maximum``, each scaled by ``1 ± jitter``."""

    def __init__(
        self,
        initial: float = defaults.RECONNECT_INITIAL,
        maximum: float = defaults.RECONNECT_MAX,
        *,
        factor: float = 2.0,
        jitter: float = defaults.RECONNECT_JITTER,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rand = rand
        self._current = initial
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt (seconds); the one after grows."""
        base = self._current
        self._current = min(self.maximum, self._current * self.factor)
        self.attempts += 1
        spread = 1.0 + self.jitter * (2.0 * self._rand() - 1.0)
        return min(self.maximum, base * spread)

    def reset(self) -> None:
        """Back to the first delay (after a connection that worked)."""
        self._current = self.initial
        self.attempts = 0
