"""Controllers: functions the agent runs on an interval, with their health.

A controller that raises is counted as failing until its next success
(``controllers_failing`` metric, ``status``). Time is injected
(:class:`flagella.clock.Clock`): tests advance a fake clock instead of
sleeping through intervals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from flagella.clock import Clock

__all__ = ["Controller", "run_controller"]

log = structlog.get_logger("flagella.agent")


@dataclass
class Controller:
    name: str
    interval: float
    func: Callable[[], Any]
    #: Run under the agent lock; False for a controller that takes it itself, only
    #: around its state changes (its I/O must not stall the API).
    locked: bool = True
    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_run: float = 0.0

    def run_once(self, now: float) -> None:
        """Run the function once and record how it went; never raises."""
        try:
            self.func()
            self.consecutive_failures = 0
        except Exception as exc:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = str(exc)
            log.warning("controller-failed", controller=self.name, error=str(exc))
        self.runs += 1
        self.last_run = now

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "interval_s": self.interval,
            "runs": self.runs,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
        }


async def run_controller(
    controller: Controller, clock: Clock, lock: asyncio.Lock, offload: bool = True
) -> None:
    """Run ``controller`` every ``interval`` seconds of ``clock``, under ``lock``
    (operations and controllers never interleave). With ``offload`` the function
    runs in the loop's executor (it blocks on netlink and bpf(2))."""
    while True:
        await clock.sleep(controller.interval)
        async with lock:
            if offload:
                await asyncio.get_running_loop().run_in_executor(None, controller.run_once, clock.now())
            else:
                controller.run_once(clock.now())
