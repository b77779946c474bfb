"""Endpoint regeneration: one serial worker per endpoint, pluggable enforcers, completions.

Theory of operation
-------------------
An *enforcer* is anything that must realize an endpoint's resolved policy: the
kernel datapath today, the xDS server (Envoy) next. :meth:`Enforcer.apply` hands
it the endpoint, the policy revision and an immutable snapshot of the policy, and
returns a :class:`Completion` at once; the enforcer completes it when the policy
is in force (the kernel: when the map writes returned; Envoy: when it ACKs) or
fails it with a reason (a NACK, a kernel error).

The agent tells the :class:`Pipeline` what changed with :meth:`Pipeline.request`
(this endpoint must be regenerated with this policy) and :meth:`Pipeline.advance`
(this endpoint was not affected by revision N: its current policy already is
revision N's). Each endpoint has at most one worker task; requests that arrive
while it runs replace the pending one (coalescing), so a burst of changes costs
one regeneration more, not one per change. Different endpoints' workers run in
parallel; no lock is held across an enforcer's writes.

A worker run: ``regenerating`` (apply on every enforcer), then
``waiting-for-enforcers`` until every completion has arrived. Enforcers run in
*stages*: the ``first`` enforcers (the node proxy) are applied and their
completions awaited before the others (the kernel) are applied at all, so
the datapath redirects a port only after Envoy ACKed its listener and
policy (cilium-1.1.md §6.5). When a first-stage completion fails or is late,
the later stages are not applied: the kernel keeps the policy it had, the
one the proxy still enforces (Cilium waits for proxy ACKs the same way
before it syncs the policy map). Only then does the
endpoint's ``policy_revision`` (the *realized* revision) advance and the
endpoint become ``ready``. A completion that fails, or does not arrive within
``completion_timeout_s``, makes the endpoint ``not-ready`` with the reason, counts
a failed regeneration, and the request is retried after an exponential backoff
(newer requests replace it meanwhile). A late completion of an abandoned attempt
is ignored.

Time comes from an injected :class:`flagella.clock.Clock`: tests drive timeouts
and backoff with :class:`flagella.clock.FakeClock`, and enforcers that delay,
fail or never complete, without sleeping.

Threads: the pipeline's coroutines run on one event loop (its own thread, after
:meth:`Pipeline.start`, or a test's loop via :meth:`Pipeline.bind`). The
blocking ``apply`` calls run in the loop's executor. The synchronous methods
(``request``, ``advance``, ``remove``, ``wait_*``) may be called from any other
thread; the ``*_async`` ones run on the pipeline's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import Counter
from collections.abc import Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog

from flagella.clock import Clock, MonotonicClock
from flagella.endpoint.lifecycle import State
from flagella.endpoint.model import Endpoint
from flagella.errors import FlagellaError
from flagella.policy.resolver import EndpointPolicy

__all__ = [
    "Completion",
    "Enforcer",
    "Pipeline",
    "RegenerationSettings",
    "RegenerationStats",
    "DURATION_BUCKETS",
]

log = structlog.get_logger("flagella.endpoint")

T = TypeVar("T")

#: Upper bounds (seconds) of the regeneration duration histogram (Cilium's buckets, trimmed).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Completion:
    """One enforcer's answer to one ``apply``: pending until completed or failed.

    Thread-safe; the first of :meth:`complete` / :meth:`fail` wins, later calls
    are ignored (an enforcer may report from any thread, even twice).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self.error: str | None = None
        self._callbacks: list[Callable[[Completion], None]] = []

    @classmethod
    def completed(cls) -> Completion:
        c = cls()
        c.complete()
        return c

    @classmethod
    def failed(cls, reason: str) -> Completion:
        c = cls()
        c.fail(reason)
        return c

    @property
    def done(self) -> bool:
        with self._lock:
            return self._done

    def complete(self) -> None:
        self._finish(None)

    def fail(self, reason: str) -> None:
        self._finish(reason or "failed")

    def _finish(self, error: str | None) -> None:
        with self._lock:
            if self._done:
                return
            self._done, self.error = True, error
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def add_done_callback(self, cb: Callable[[Completion], None]) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(cb)
                return
        cb(self)


class Enforcer(Protocol):
    """What the pipeline asks of the kernel datapath, the xDS server, ..."""

    #: Names the enforcer in states, logs and metrics ("datapath", "xds").
    name: str

    def apply(self, endpoint: Endpoint, revision: int, policy: EndpointPolicy) -> Completion:
        """Start realizing ``policy`` (revision ``revision``) for ``endpoint``.

        May block (kernel writes); raising counts as a failed completion.
        """
        ...

    def remove(self, endpoint: Endpoint) -> None:
        """Forget the endpoint: nothing of it may stay in force. Idempotent."""
        ...


@dataclass(frozen=True)
class RegenerationSettings:
    #: How long a regeneration waits for every enforcer's completion.
    completion_timeout_s: float = 10.0
    #: First retry delay after a failed regeneration; doubles per failure up to the max.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    def backoff(self, failures: int) -> float:
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, failures - 1)))


@dataclass
class RegenerationStats:
    """Counts by outcome and a duration histogram, read by the metrics collector."""

    outcomes: Counter[str] = field(default_factory=Counter)
    #: Cumulative count per bucket upper bound of DURATION_BUCKETS (+Inf last).
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0

    def record(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] += 1
        self.duration_sum += seconds
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
        self.buckets[-1] += 1


@dataclass
class _Request:
    ticket: int
    revision: int
    policy: EndpointPolicy


@dataclass
class _Slot:
    """Everything the pipeline knows about one endpoint."""

    endpoint: Endpoint
    pending: _Request | None = None
    #: Latest revision the newest request is known to be equivalent to (see advance).
    covered: int = 0
    #: Tickets: every request gets the next one; realized = newest fully completed.
    requested: int = 0
    realized: int = 0
    #: The newest ticket whose attempt finished, realized or failed.
    finished: int = 0
    failures: int = 0
    task: asyncio.Task[None] | None = None
    applying: asyncio.Future[list[tuple[str, Completion]]] | None = None
    removed: bool = False


class Pipeline:
    def __init__(
        self,
        enforcers: Sequence[Enforcer],
        settings: RegenerationSettings | None = None,
        clock: Clock | None = None,
        on_change: Callable[[Endpoint], None] | None = None,
        offload: bool = True,
        first: Sequence[Enforcer] = (),
    ) -> None:
        """``on_change`` is called (on the pipeline's loop) after each state change
        but the start of a regeneration (its outcome follows), to persist the endpoint
        (progress only: restore recomputes it, so it need not be durable). With ``offload=False`` enforcers' ``apply`` runs on
        the loop itself (deterministic tests with in-memory enforcers)."""
        #: Stages, applied in order; each stage's completions before the next applies.
        self.stages = [list(first), list(enforcers)] if first else [list(enforcers)]
        self.enforcers = [e for stage in self.stages for e in stage]
        self.settings = settings or RegenerationSettings()
        self.clock: Clock = clock or MonotonicClock()
        self.stats = RegenerationStats()
        self._on_change = on_change
        self._offload = offload
        self._slots: dict[int, _Slot] = {}
        self._ticket = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- the loop -----------------------------------------------------------------

    def start(self) -> None:
        """Run the pipeline on a loop in a thread of its own (the agent)."""
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="flagella-regeneration", daemon=True)
        self._thread.start()
        ready.wait()
        self._loop = loop

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the pipeline on ``loop`` (tests that drive it from a coroutine)."""
        self._loop = loop

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None or self._thread is None:
            return

        async def cancel_all() -> None:
            tasks = [s.task for s in self._slots.values() if s.task is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join()
        loop.close()
        self._thread = None

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _call(self, fn: Callable[[], None]) -> None:
        if self._loop is None:
            raise FlagellaError("regeneration pipeline is not running")
        if self._on_loop():
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def _block(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise FlagellaError("regeneration pipeline is not running")
        if self._on_loop():
            coro.close()
            raise FlagellaError("a blocking pipeline call from the pipeline's own loop would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- what the agent tells it ----------------------------------------------------

    def request(self, endpoint: Endpoint, revision: int, policy: EndpointPolicy) -> None:
        """Regenerate ``endpoint`` with ``policy`` (a snapshot nobody mutates later)."""
        self._call(lambda: self._request(endpoint, revision, policy))

    def advance(self, endpoints: Iterable[Endpoint], revision: int) -> None:
        """``revision`` did not change these endpoints' policy: it is realized as soon
        as their newest request is."""
        eps = list(endpoints)
        self._call(lambda: self._advance(eps, revision))

    def halt(self, endpoint: Endpoint) -> None:
        """Stop the endpoint's worker, waiting out an apply in progress: no enforcer
        is asked anything about it afterwards. Blocking; not on the pipeline's loop."""
        self._block(self._halt(endpoint.id))

    def remove(self, endpoint: Endpoint) -> None:
        """:meth:`halt`, then have every enforcer remove the endpoint."""
        self._block(self._halt(endpoint.id))
        self._remove_from_enforcers(endpoint)

    async def remove_async(self, endpoint: Endpoint) -> None:
        await self._halt(endpoint.id)
        self._remove_from_enforcers(endpoint)

    def wait_revision(self, revision: int, timeout: float, endpoints: Collection[int] | None = None) -> list[Endpoint]:
        """Wait until every (or each of ``endpoints``) endpoint realized ``revision``;
        return those that still lag when ``timeout`` passes."""
        return self._block(self.wait_revision_async(revision, timeout, endpoints))

    def wait_revision_future(
        self, revision: int, timeout: float, endpoints: Collection[int] | None = None
    ) -> concurrent.futures.Future[list[Endpoint]]:
        """:meth:`wait_revision` as a future (for another event loop to await)."""
        if self._loop is None:
            raise FlagellaError("regeneration pipeline is not running")
        return asyncio.run_coroutine_threadsafe(self.wait_revision_async(revision, timeout, endpoints), self._loop)

    def wait_settled(self, endpoints: Collection[int], timeout: float) -> list[Endpoint]:
        """Wait until every request made so far for ``endpoints`` has been attempted:
        realized, or failed visibly (``not-ready``, retried in the background)."""
        return self._block(self.wait_settled_async(endpoints, timeout))

    async def wait_revision_async(
        self, revision: int, timeout: float, endpoints: Collection[int] | None = None
    ) -> list[Endpoint]:
        def lagging() -> list[Endpoint]:
            ids = self._slots.keys() if endpoints is None else endpoints
            slots = (self._slots.get(i) for i in ids)
            return [s.endpoint for s in slots if s is not None and s.endpoint.policy_revision < revision]

        return await self._wait(lagging, timeout)

    async def wait_settled_async(self, endpoints: Collection[int], timeout: float) -> list[Endpoint]:
        targets = {i: s.requested for i in endpoints if (s := self._slots.get(i)) is not None}

        def lagging() -> list[Endpoint]:
            out = []
            for i, ticket in targets.items():
                s = self._slots.get(i)
                if s is not None and s.finished < ticket:
                    out.append(s.endpoint)
            return out

        return await self._wait(lagging, timeout)

    def lagging(self, revision: int) -> list[Endpoint]:
        """Endpoints that have not realized ``revision`` (a snapshot, no waiting)."""
        return [s.endpoint for s in list(self._slots.values()) if s.endpoint.policy_revision < revision]

    # -- on the loop ------------------------------------------------------------------

    def _request(self, endpoint: Endpoint, revision: int, policy: EndpointPolicy) -> None:
        slot = self._slots.get(endpoint.id)
        if slot is None or slot.removed:
            slot = self._slots[endpoint.id] = _Slot(endpoint)
        slot.endpoint = endpoint
        self._ticket += 1
        slot.requested = self._ticket
        slot.pending = _Request(self._ticket, revision, policy)
        slot.covered = revision
        if slot.task is None:
            slot.task = asyncio.get_running_loop().create_task(self._work(slot))

    def _advance(self, endpoints: list[Endpoint], revision: int) -> None:
        for ep in endpoints:
            slot = self._slots.get(ep.id)
            if slot is None:
                continue
            if slot.task is None and slot.realized == slot.requested:
                ep.policy_revision = max(ep.policy_revision, revision)
            else:
                slot.covered = max(slot.covered, revision)
        self._notify()

    async def _halt(self, ep_id: int) -> None:
        slot = self._slots.pop(ep_id, None)
        if slot is None:
            return
        slot.removed = True
        if slot.task is not None:
            slot.task.cancel()
            await asyncio.gather(slot.task, return_exceptions=True)
        if slot.applying is not None:
            # An apply already in a thread cannot be interrupted: let it finish, so
            # that removal really comes after it.
            await asyncio.gather(slot.applying, return_exceptions=True)
        self._notify()

    def _remove_from_enforcers(self, endpoint: Endpoint) -> None:
        errors = []
        for enforcer in self.enforcers:
            try:
                enforcer.remove(endpoint)
            except Exception as exc:  # every enforcer gets its chance; report them all
                errors.append(f"{enforcer.name}: {exc}")
        if errors:
            raise FlagellaError(f"endpoint {endpoint.id}: removal failed: " + "; ".join(errors))

    async def _work(self, slot: _Slot) -> None:
        try:
            await self._work_loop(slot)
        except Exception:  # a bug: the next request starts a new worker
            log.exception("regeneration-worker-failed", endpoint=slot.endpoint.id)
        finally:
            slot.task = None

    async def _work_loop(self, slot: _Slot) -> None:
        while slot.pending is not None and not slot.removed:
            req, slot.pending = slot.pending, None
            error = await self._run(slot, req)
            if slot.removed:
                return
            if error is None:
                slot.failures = 0
                continue
            slot.failures += 1
            if slot.pending is None:
                slot.pending = req  # retry it; a newer request replaces it meanwhile
            await self.clock.sleep(self.settings.backoff(slot.failures))

    async def _run(self, slot: _Slot, req: _Request) -> str | None:
        """One regeneration; returns the failure reason, or None once realized."""
        ep = slot.endpoint
        started = self.clock.now()
        self._set_state(ep, State.REGENERATING, "", persist=False)  # the outcome is persisted
        error: str | None = None
        for stage in self.stages:
            error = await self._run_stage(slot, req, stage)
            if error is not None or slot.removed:
                break
        if slot.removed:
            return None
        elapsed = self.clock.now() - started
        slot.finished = req.ticket
        if error is None:
            self.stats.record("success", elapsed)
            slot.realized = req.ticket
            realized = max(req.revision, slot.covered) if slot.pending is None else req.revision
            ep.policy_revision = max(ep.policy_revision, realized)
            ep.enforcing_ingress = req.policy.ingress.enforced
            ep.enforcing_egress = req.policy.egress.enforced
            if slot.pending is None:
                self._set_state(ep, State.READY, "")
            elif self._on_change is not None:
                self._on_change(ep)
            log.debug("endpoint-regenerated", endpoint=ep.id, revision=realized, seconds=elapsed)
        else:
            self.stats.record("failure", elapsed)
            self._set_state(ep, State.NOT_READY, error)
            log.warning(
                "endpoint-regeneration-failed", endpoint=ep.id, revision=req.revision,
                error=error, failures=slot.failures + 1,
            )
        self._notify()
        return error

    async def _run_stage(self, slot: _Slot, req: _Request, enforcers: list[Enforcer]) -> str | None:
        """Apply ``enforcers`` and await their completions; the failure reason or None."""
        ep = slot.endpoint
        try:
            completions = await self._apply_all(slot, req, enforcers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return str(exc)
        if slot.removed:
            return None
        waiting = [name for name, c in completions if not c.done]
        if waiting:
            self._set_state(ep, State.WAITING_FOR_ENFORCERS, "waiting for " + ", ".join(waiting))
        return await self._await_completions(completions)

    async def _apply_all(
        self, slot: _Slot, req: _Request, enforcers: list[Enforcer]
    ) -> list[tuple[str, Completion]]:
        ep = slot.endpoint

        def apply_each() -> list[tuple[str, Completion]]:
            out = []
            for enforcer in enforcers:
                try:
                    completion = enforcer.apply(ep, req.revision, req.policy)
                except Exception as exc:
                    completion = Completion.failed(f"{type(exc).__name__}: {exc}")
                out.append((enforcer.name, completion))
            return out

        if not self._offload:
            return apply_each()
        loop = asyncio.get_running_loop()
        slot.applying = loop.run_in_executor(None, apply_each)
        try:
            return await asyncio.shield(slot.applying)
        finally:
            if slot.applying.done():
                slot.applying = None

    async def _await_completions(self, completions: list[tuple[str, Completion]]) -> str | None:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        for _, completion in completions:
            fut: asyncio.Future[None] = loop.create_future()
            completion.add_done_callback(_bridge(loop, fut))
            futures.append(fut)
        timeout = self.settings.completion_timeout_s
        if futures and not all(f.done() for f in futures):
            everything: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*futures))
            timer: asyncio.Future[Any] = loop.create_task(self.clock.sleep(timeout))
            try:
                await asyncio.wait([everything, timer], return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
                everything.cancel()
        failed = [f"{name}: {c.error}" for name, c in completions if c.done and c.error]
        late = [name for name, c in completions if not c.done]
        if failed:
            return "enforcer " + "; ".join(failed)
        if late:
            return f"enforcer {', '.join(late)}: no completion within {timeout:g}s"
        return None

    def _set_state(self, ep: Endpoint, state: State, reason: str, persist: bool = True) -> None:
        if ep.state in (State.DISCONNECTING, State.DISCONNECTED):
            return
        if ep.state != state:
            ep.set_state(state)
        ep.state_reason = reason
        if persist and self._on_change is not None:
            self._on_change(ep)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait(self, lagging: Callable[[], list[Endpoint]], timeout: float) -> list[Endpoint]:
        deadline = self.clock.now() + timeout
        loop = asyncio.get_running_loop()
        while True:
            behind = lagging()
            remaining = deadline - self.clock.now()
            if not behind or remaining <= 0:
                return behind
            changed: asyncio.Future[None] = loop.create_future()
            self._waiters.append(changed)
            timer = loop.create_task(self.clock.sleep(remaining))
            try:
                await asyncio.wait({changed, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()


def _bridge(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> Callable[[Completion], None]:
    """A completion callback (any thread) that resolves ``fut`` on its loop."""

    def done(_: Completion) -> None:
        loop.call_soon_threadsafe(_resolve, fut)

    return done


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

