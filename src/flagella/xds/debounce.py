"""Push debouncing (istiod's rule: 100 ms of quiet, at most 10 s) and the clock seam.

`Debouncer` is pure: `changed(now)` records a change, `due_in(now)` says how
long until the push should run (None when nothing is pending), `fired()`
resets. The server sleeps on a `Clock`; tests pass `FakeClock` and move time
by hand instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass
class FakeClock:
    """Time moves only by `advance`; sleepers wake when their deadline passes."""

    t: float = 0.0
    _sleepers: list[tuple[float, asyncio.Future[None]]] = field(default_factory=list)

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        self.t += seconds
        still = []
        for deadline, fut in self._sleepers:
            if deadline <= self.t + 1e-9:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((deadline, fut))
        self._sleepers = still


@dataclass
class Debouncer:
    quiet: float = 0.1
    max_delay: float = 10.0
    first: float | None = None
    last: float | None = None

    def changed(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def due_in(self, now: float) -> float | None:
        if self.first is None or self.last is None:
            return None
        return max(0.0, min(self.last + self.quiet, self.first + self.max_delay) - now)

    def fired(self) -> None:
        self.first = self.last = None
