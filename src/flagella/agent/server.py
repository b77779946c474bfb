"""The agent process: API socket, controllers, metrics, event monitor.

One asyncio loop. Requests are handled one at a time under a lock (every
operation ends with the kernel enforcing its result, so there is nothing to
gain from interleaving them), while controllers run on their intervals:

* ``sync-maps`` makes every map equal to the desired state and counts
  repairs (drift from bpftool or anything else);
* ``ct-gc`` deletes expired conntrack entries;
* ``events`` drains the kernel's event ring into the monitor subscribers.

With ``k8s`` settings the Kubernetes watchers run on threads of their own; each
change they bring runs as one more request under the lock
(`flagella.agent.cluster`).

A controller that raises is counted as failing until its next success
(``controllers_failing`` metric, ``status``).

The socket is reachable by every member of the agent's group, so no client
may hold the agent for the others (settings ``api.*``):

* at most `connection_cap` connections are served at once, below the fd limit;
  a connection beyond it is answered "agent busy" and closed at once;
* a connection that has not delivered its request line within
  ``idle_timeout_s`` (or does not take its answer) is closed with an error;
* a request line over ``max_request_bytes`` is answered with an error and the
  connection closed, nothing of it applied;
* ``policy.trace`` takes the lock only to snapshot the policies and resolve
  endpoint names; it runs on a worker thread of its own, outside the lock,
  checks ``trace_timeout_s`` between queries and is abandoned with an error
  past it. HTTP regexes are RE2, so one query is linear in its input.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from flagella import rpc
from flagella.agent.cni import CniAttachments, write_conflist
from flagella.agent.controllers import Controller, run_controller
from flagella.agent.core import AgentCore, parse_kv
from flagella.agent.istio import IstioSidecars
from flagella.agent.kvstore import ClusterSync, cluster_backend, run_locked
from flagella.agent.metrics import DIRECTIONS, reason_name, start_metrics
from flagella.agent.proxy import NodeProxy
from flagella.agent.settings import connection_cap
from flagella.clock import Clock, MonotonicClock
from flagella.datapath.entries import PolicyKey
from flagella.errors import FlagellaError, InputError
from flagella.policy.api import PROTOCOL_NAMES, Policy
from flagella.policy.labels import LabelSet
from flagella.policy.query import parse_named_ports, parse_query
from flagella.policy.trace import TraceQuery, Tracer
from flagella.proxy.kafka_envoy import tune_allocator
from flagella.xds.server import XdsServer
from flagella.xds.status import rows_to_json

log = structlog.get_logger("flagella.agent")
_T = TypeVar("_T")


@dataclass
class AgentServer:
    core: AgentCore
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    controllers: list[Controller] = field(default_factory=list)
    subscribers: list[asyncio.Queue[dict[str, Any]]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    clock: Clock = field(default_factory=MonotonicClock)
    connections: int = 0
    xds: XdsServer | None = None  # started and stopped with the agent when set
    proxy: NodeProxy | None = None  # the node proxy (its xDS server becomes ``xds``)
    cluster: Any = None  # the Kubernetes watchers (`flagella.k8s.Controller`) when configured
    k8s_api: Any = None  # their `kubernetes.client.ApiClient` (built from the settings when None)
    istio: IstioSidecars | None = None  # Istio sidecar mode (on the same xDS server)

    def __post_init__(self) -> None:
        s = self.core.settings
        if self.proxy is not None:
            self.xds = self.proxy.server
            self.proxy.sinks.append(self._broadcast)
        elif self.istio is not None:
            self.xds = self.istio.server
        self.max_connections = connection_cap(s.api, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        # One trace at a time: an abandoned trace finishes its current query before the next starts.
        self.trace_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace")
        self.controllers = [
            Controller("sync-maps", s.controllers.sync_interval_s, self.core.sync_all),
            Controller("host-addresses", s.controllers.sync_interval_s, self.core.refresh_host_addresses),
            Controller("ct-gc", s.conntrack.gc_interval_s, self.core.ct_gc),
            Controller("ct-gc-non-tcp", s.conntrack.gc_interval_non_tcp_s, lambda: self.core.ct_gc(tcp=False)),
        ]
        backend = cluster_backend(self.core.allocator.backend)
        if backend is not None and self.core.cluster is not None:
            self.cluster_sync = ClusterSync(backend, s.kvstore.cluster_prefix)
            self.controllers += [
                Controller("kvstore-sync", s.kvstore.sync_interval_s, self._kvstore_sync, locked=False),
                # gc txns are guarded by etcd revisions, not by the agent lock
                Controller("identity-gc", s.kvstore.gc_interval_s, backend.gc, locked=False),
            ]
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": lambda p: self.status(),
            "endpoint.create": self.endpoint_create,
            "endpoint.list": lambda p: [ep.to_json() for ep in sorted(self.core.endpoints.values(), key=lambda e: e.id)],
            "endpoint.get": lambda p: self._endpoint_detail(p),
            "endpoint.delete": lambda p: self.core.delete_endpoint(_req(p, "name")).to_json(),
            "endpoint.labels": lambda p: self.core.set_endpoint_labels(
                _req(p, "name"), parse_kv(_strs(p, "set"), "--set"), _strs(p, "unset")
            ).to_json(),
            "namespace.labels": lambda p: self.core.set_namespace_labels(
                _req(p, "namespace"), parse_kv(_strs(p, "set"), "--set"), _strs(p, "unset")
            ),
            "policy.import": self.policy_import,
            "policy.get": lambda p: {
                "revision": self.core.engine.revision,
                "policies": [pol.source for pol in self.core.engine.policies.values()],
            },
            "policy.delete": lambda p: {
                "revision": self.core.delete_policies(
                    _strs(p, "names"), _opt(p, "namespace"), p.get("all") is True
                )
            },
            "policy.trace": self.policy_trace,
            "identity.list": lambda p: list(self.core.identities().values()),
            "identity.get": self.identity_get,
            "bpf.policy": self.bpf_policy,
            "bpf.ct": lambda p: self.bpf_ct(),
            "bpf.ipcache": lambda p: sorted(
                ({"prefix": str(k), "identity": v} for k, v in self.core.dp.ipcache.items()),
                key=lambda r: r["prefix"],
            ),
            "bpf.metrics": lambda p: self.bpf_metrics(),
            "proxy.status": lambda p: rows_to_json(self.xds.status()) if self.xds else [],
            **CniAttachments(self.core).handlers(),
        }

    # -- handlers -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out = self.core.status()
        failing = [c.name for c in self.controllers if c.consecutive_failures]
        out["controllers"] = [c.to_json() for c in self.controllers]
        out["controllers_failing"] = len(failing)
        out["uptime_s"] = round(time.time() - self.started, 1)
        if self.cluster is not None:
            out["k8s"] = {
                "node": self.core.settings.k8s.node_name,
                "runtime": self.cluster.runtime,
                "skipped": self.cluster.skipped_total,
                "waiting": self.core.pod_cidr_missing,
            }
        return out

    async def run_locked(self, fn: Callable[[], Any]) -> Any:
        """``fn`` as one request: under the lock, off the loop."""
        async with self.lock:
            return await asyncio.get_running_loop().run_in_executor(None, fn)

    def start_cluster(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the Kubernetes watchers; their changes run through `run_locked` on ``loop``."""
        from flagella.agent.cluster import ClusterBridge
        from flagella.k8s import compose

        k8s = self.core.settings.k8s

        def locked(fn: Callable[[], Any]) -> Any:
            return asyncio.run_coroutine_threadsafe(self.run_locked(fn), loop).result()

        self.cluster = compose(ClusterBridge(self.core, k8s, locked), k8s, self.k8s_api)
        self.cluster.start()
        log.info("k8s-watchers-started", node=k8s.node_name, runtime=self.cluster.runtime)

    def endpoint_create(self, p: dict[str, Any]) -> dict[str, Any]:
        named: dict[str, list[tuple[int, int]]] = {}
        for name, ports in parse_named_ports(_strs(p, "named_ports"), "--named-port").items():
            named.setdefault(name, []).extend(sorted(ports))
        ep = self.core.create_endpoint(
            name=_req(p, "name"),
            namespace=_opt(p, "namespace") or "default",
            labels=parse_kv(_strs(p, "labels"), "--labels"),
            namespace_labels=parse_kv(_strs(p, "namespace_labels"), "--namespace-labels"),
            service_account=_opt(p, "service_account"),
            ipv4=_opt(p, "ipv4"),
            ipv6=_opt(p, "ipv6"),
            named_ports=named,
            istio_sidecar=_bool(p, "istio_sidecar"),
        )
        return ep.to_json()

    def _endpoint_detail(self, p: dict[str, Any]) -> dict[str, Any]:
        ep = self.core.find(_req(p, "name"))
        out = ep.to_json()
        out["identity_labels"] = sorted(str(x) for x in self.core._security_labels(ep))
        pol = self.core.engine.resolved.get(ep.id)
        if pol is not None:
            out["policy"] = {
                "selected_rules": sorted(pol.selected),
                "ingress_entries": len(pol.ingress),
                "egress_entries": len(pol.egress),
            }
        return out

    def policy_import(self, p: dict[str, Any]) -> dict[str, Any]:
        docs = p.get("documents")
        if not isinstance(docs, list):
            raise InputError("documents: expected a list")
        return {"revision": self.core.import_policies(docs, _strs(p, "sources") or None)}

    async def policy_wait(self, p: dict[str, Any]) -> dict[str, Any]:
        """Wait (outside the lock) until every endpoint realized ``revision`` with every
        enforcer, or ``timeout`` seconds passed (default 0: just report)."""
        revision = p.get("revision", self.core.engine.revision)
        if isinstance(revision, bool) or not isinstance(revision, int):
            raise InputError("revision: expected an integer")
        timeout = p.get("timeout", 0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
            raise InputError("timeout: expected a number of seconds, 0-3600")
        lagging = await asyncio.wrap_future(
            self.core.pipeline.wait_revision_future(revision, float(timeout))
        )
        return {
            "revision": revision,
            "waiting": [ep.id for ep in lagging],
            "lagging": [ep.to_json() for ep in lagging],
        }

    def policy_trace(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        """Trace against the live policies; a side may name a live endpoint (blocking form)."""
        policies, queries, identities = self.trace_snapshot(p)
        deadline = time.monotonic() + self.core.settings.api.trace_timeout_s
        return self.run_trace(policies, queries, deadline, identities)

    def trace_snapshot(
        self, p: dict[str, Any]
    ) -> tuple[list[Policy], list[TraceQuery], dict[LabelSet, int]]:
        """What a trace needs from the agent's state; the only part that runs under the lock."""
        queries = p.get("queries")
        if not isinstance(queries, list):
            raise InputError("queries: expected a list")
        parsed = []
        for q in queries:
            if isinstance(q, dict):
                q = dict(q)
                for side in ("src", "dst"):
                    ref = q.get(side, {}).get("endpoint") if isinstance(q.get(side), dict) else None
                    if ref:
                        q[side] = self._endpoint_side(str(ref))
            parsed.append(parse_query(q))
        return list(self.core.engine.policies.values()), parsed, self.core.live_identities()

    def run_trace(
        self, policies: list[Policy], queries: list[TraceQuery], deadline: float,
        identities: dict[LabelSet, int] | None = None,
    ) -> list[dict[str, Any]]:
        """Answer ``queries`` against ``policies`` (a snapshot), giving up at ``deadline``.

        ``identities`` (live label sets and their numbers) make a traced endpoint show its
        real identity rather than one the tracer numbers itself.
        """
        tracer = Tracer(policies, self.core.settings.policy, self.core.label_filter, identities)
        answers = []
        for q in queries:
            if time.monotonic() > deadline:
                raise self._trace_timeout()
            answers.append(tracer.trace(q).to_json())
        return answers

    def _trace_timeout(self) -> InputError:
        limit = self.core.settings.api.trace_timeout_s
        return InputError(f"policy.trace: not finished within {limit:g}s (api.trace_timeout_s); trace fewer queries")

    async def policy_trace_unlocked(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        async with self.lock:
            policies, queries, identities = await loop.run_in_executor(None, self.trace_snapshot, p)
        limit = self.core.settings.api.trace_timeout_s
        work = loop.run_in_executor(
            self.trace_worker, self.run_trace, policies, queries, time.monotonic() + limit, identities
        )
        try:
            return await asyncio.wait_for(work, limit)
        except TimeoutError:
            raise self._trace_timeout() from None

    def _endpoint_side(self, ref: str) -> dict[str, Any]:
        ep = self.core.find(ref)
        return {
            "labels": sorted(str(x) for x in ep.identity_labels()),
            "ip": str(ep.ipv4 or ep.ipv6),
            "named_ports": [
                f"{name}={port}/{PROTOCOL_NAMES.get(proto, 'TCP')}"
                for name, ports in ep.named_ports.items()
                for port, proto in ports
            ],
        }

    def identity_get(self, p: dict[str, Any]) -> dict[str, Any]:
        raw = _req(p, "id")
        if not raw.isdigit():
            raise InputError(f"id: {raw!r} is not an identity number")
        ident = int(raw)
        found = self.core.identities().get(ident)
        if found is None:
            raise InputError(f"identity {ident} not found")
        return found

    def bpf_policy(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        ep = self.core.find(_req(p, "name"))
        rows = []
        for key, (value, counters) in sorted(self.core.dp.policy_counters(ep.id).items()):
            rows.append(_policy_row(key, value.verdict, value.proxy_port, counters.packets, counters.bytes))
        return rows

    def bpf_ct(self) -> list[dict[str, Any]]:
        now = self.core.dp.now_ns()
        return [
            {
                "endpoint": r.ep_id,
                "direction": "egress" if r.egress else "ingress",
                "proto": r.proto,
                "src": f"{r.saddr}:{r.sport}",
                "dst": f"{r.daddr}:{r.dport}",
                "expires_in_s": round((r.expires_ns - now) / 1e9, 1),
                "packets": r.packets,
                "bytes": r.bytes,
                "flags": r.flags,
            }
            for r in self.core.dp.ct_entries()
        ]

    def bpf_metrics(self) -> list[dict[str, Any]]:
        rows = [
            {"reason": reason_name(reason), "direction": DIRECTIONS.get(d, "UNKNOWN"), "packets": c.packets, "bytes": c.bytes}
            for (reason, d), c in sorted(self.core.dp.metrics().items())
        ]
        # The node proxy's denied requests, as Cilium counts L7 drops next to the kernel's.
        l7 = self.proxy.l7_drops() if self.proxy is not None else {}
        rows += [{"reason": r, "direction": d, "packets": n, "bytes": 0} for (r, d), n in l7.items()]
        return rows

    # -- serving -------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        api = self.core.settings.api
        self.connections += 1
        try:
            if self.connections > self.max_connections:
                raise _Refused(
                    AgentBusy(f"agent busy: {self.max_connections} connections open (api.max_connections); retry later")
                )
            try:
                line = await asyncio.wait_for(reader.readline(), api.idle_timeout_s)
            except TimeoutError:
                raise _Refused(InputError(f"request: not received within {api.idle_timeout_s:g}s (api.idle_timeout_s)")) from None
            except ValueError:  # the stream's limit: no newline within max_request_bytes
                raise _Refused(
                    InputError(f"request: larger than {api.max_request_bytes} bytes (api.max_request_bytes)")
                ) from None
            if not line:
                return
            answer = await self._answer(line, writer)
            if answer is not None:
                writer.write(answer)
                await asyncio.wait_for(writer.drain(), api.idle_timeout_s)
        except _Refused as refused:
            with contextlib.suppress(Exception):
                writer.write(rpc.error(refused.error))
                await asyncio.wait_for(writer.drain(), 1.0)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self.connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter) -> bytes | None:
        """The answer line to one request line (None when a stream has taken the connection)."""
        loop = asyncio.get_running_loop()
        try:
            # A big line takes a while to decode: not on the loop, which serves everyone.
            req = rpc.decode(line) if len(line) < 65536 else await loop.run_in_executor(None, rpc.decode, line)
            if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                raise InputError("request: expected {\"method\": ..., \"params\": {...}}")
            method = req["method"]
            params = req.get("params") or {}
            if not isinstance(params, dict):
                raise InputError("params: expected an object")
            if method == "monitor":
                await self.stream_events(params, writer)
                return None
            if method == "policy.trace":
                return rpc.ok(await self.policy_trace_unlocked(params))
            if method == "policy.wait":  # waits for the pipeline, never holds the lock
                return rpc.ok(await self.policy_wait(params))
            handler = self.handlers.get(method)
            if handler is None:
                raise InputError(f"unknown method {method!r}")
            async with self.lock:
                # Off the loop: netlink and bpf(2) block, and pyroute2 runs loops of its own.
                result = await loop.run_in_executor(None, handler, params)
            return rpc.ok(result)
        except FlagellaError as exc:
            return rpc.error(exc)
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("request-failed")
            return rpc.error(RuntimeError(f"internal error: {exc}"))

    async def stream_events(self, params: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        kind = params.get("type")
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10000)
        self.subscribers.append(queue)
        try:
            writer.write(rpc.ok({"subscribed": True}))
            await writer.drain()
            while True:
                event = await queue.get()
                if kind and event.get("type") != kind:
                    continue
                writer.write(rpc.encode(event))
                # A subscriber that stops reading is dropped, not buffered for.
                await asyncio.wait_for(writer.drain(), self.core.settings.api.idle_timeout_s)
        except TimeoutError:
            log.info("monitor-subscriber-dropped", reason="not reading")
        finally:
            self.subscribers.remove(queue)

    def _broadcast(self, ev: dict[str, Any]) -> None:
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(ev)

    async def pump_events(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            events = await loop.run_in_executor(None, self.core.dp.poll_events, 200)
            for ev in events:
                self._broadcast(ev)
            if not events:
                await asyncio.sleep(0.05)

    async def start_api(self, path: str) -> asyncio.Server:
        """Listen on ``path`` (mode 0660) with the request size limit of the settings."""
        server = await asyncio.start_unix_server(
            self.handle, path=path, limit=self.core.settings.api.max_request_bytes
        )
        os.chmod(path, 0o660)
        return server

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Serve until SIGINT/SIGTERM, or until ``stop`` is set (then no signal
        handlers are installed: an agent embedded in a test's thread)."""
        path = self.core.settings.socket_path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await self.start_api(path)
        conf = write_conflist(self.core.settings)  # the runtime may call the plugin from now on
        if conf is not None:
            log.info("cni-conf-written", path=str(conf))
        start_metrics(self.core, lambda: self.controllers, [self.proxy] if self.proxy else [],
                      self.proxy.l7_drops if self.proxy else None)
        if self.istio is not None:
            await self.istio.start()  # before the server serves; starts it unless it is the proxy's
        if self.proxy is not None:
            await self.proxy.start()
        elif self.xds is not None and self.istio is None:
            await self.xds.start()
        self.loop = asyncio.get_running_loop()
        tasks = [
            asyncio.create_task(run_controller(c, self.clock, self.lock if c.locked else asyncio.Lock()))
            for c in self.controllers
        ]
        tasks.append(asyncio.create_task(self.pump_events()))
        if self.core.settings.k8s.enabled:
            self.start_cluster(asyncio.get_running_loop())
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        log.info("agent-ready", socket=path)
        async with server:
            await stop.wait()
        if self.cluster is not None:
            # Watcher threads may wait for the lock: the loop must run while they stop.
            await asyncio.get_running_loop().run_in_executor(None, self.cluster.stop)
        for t in tasks:
            t.cancel()
        if self.istio is not None:
            await self.istio.stop()
        if self.proxy is not None:
            await self.proxy.stop()
        elif self.xds is not None and self.istio is None:
            await self.xds.stop()
        self.trace_worker.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("agent-stopped")


    def _kvstore_sync(self) -> None:
        """Runs in an executor thread: etcd I/O outside the lock, state changes inside."""

        def locked(fn: Callable[[], _T]) -> _T:
            return asyncio.run_coroutine_threadsafe(run_locked(self.lock, fn), self.loop).result()

        self.cluster_sync.run(self.core.apply_cluster, locked, self.core.cluster_entries)


class AgentBusy(FlagellaError):
    """No room for another connection; the client may retry."""


@dataclass
class _Refused(Exception):
    """A connection answered with ``error`` and closed without running a request."""

    error: FlagellaError


def _req(p: dict[str, Any], key: str) -> str:
    """A required string parameter (an endpoint may also be named by its numeric id)."""
    value = p.get(key)
    if value in (None, ""):
        raise InputError(f"{key}: required")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{key}: expected a string")
    return str(value)


def _bool(p: dict[str, Any], key: str) -> bool:
    value = p.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"{key}: expected true or false")
    return value


def _opt(p: dict[str, Any], key: str) -> str | None:
    value = p.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise InputError(f"{key}: expected a string")
    return value


def _strs(p: dict[str, Any], key: str) -> list[str]:
    """An optional list of strings (a single string is a list of one)."""
    value = p.get(key)
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{key}: expected a list of strings")
    return value


def _policy_row(key: PolicyKey, verdict: int, proxy_port: int, packets: int, nbytes: int) -> dict[str, Any]:
    names = {1: "allow", 2: "deny", 3: "redirect"}
    span = 1 << key.wild_bits
    ports = "any" if key.wild_bits >= 16 else (
        str(key.port) if span == 1 else f"{key.port}-{key.port + span - 1}"
    )
    return {
        "direction": "egress" if key.egress else "ingress",
        "identity": key.identity,
        "protocol": key.protocol,
        "ports": ports,
        "verdict": names.get(verdict, str(verdict)),
        "proxy_port": proxy_port,
        "packets": packets,
        "bytes": nbytes,
    }


def run_agent(
    core: AgentCore, proxy: NodeProxy | None = None, k8s_api: Any = None, istio: IstioSidecars | None = None
) -> None:
    core.restore()
    if istio is not None:
        istio.ensure_init_policy(core)
    if proxy is not None or istio is not None:
        tune_allocator()  # their Kafka ext_proc service moves ~1 MiB messages (its docstring)
    server = AgentServer(core, proxy=proxy, k8s_api=k8s_api, istio=istio)
    try:
        asyncio.run(server.serve())
    finally:
        core.close()


