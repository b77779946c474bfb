"""Time, injected: the real monotonic clock and a fake one tests advance by hand.

Everything that waits (regeneration timeouts and backoff, controller intervals,
``policy wait``) asks a :class:`Clock` instead of calling ``time`` or
``asyncio.sleep`` itself, so a test can run hours of retries in microseconds and
decide exactly when a deadline passes (trio's ``MockClock``, without autojump).

:class:`FakeClock` is thread-safe: a sleeper may wait on any event loop, and
``advance`` may be called from any thread; due sleepers are woken on their own
loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "MonotonicClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when :meth:`advance` is called."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (lets a test see that a worker is waiting)."""
        with self._lock:
            return sum(1 for _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            deadline = self._now + max(0.0, seconds)
            if deadline <= self._now:
                fut.set_result(None)
            else:
                self._sleepers.append((deadline, fut))
        try:
            await fut
        finally:
            with self._lock:
                self._sleepers = [(d, f) for d, f in self._sleepers if f is not fut]

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._now += seconds
            due = [f for d, f in self._sleepers if d <= self._now]
            self._sleepers = [(d, f) for d, f in self._sleepers if d > self._now]
        for fut in due:
            fut.get_loop().call_soon_threadsafe(_wake, fut)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
