"""A small asyncio etcd v3 client over etcd's JSON gateway (``/v3/...``).

etcd 3.4 serves its v3 gRPC API also as JSON over HTTP/1.1 (grpc-gateway):
``POST /v3/kv/range`` with ``{"key": base64}`` and so on. This client speaks
just that, with asyncio streams and a pool of keep-alive connections:
requests on different connections are in flight at once (etcd batches their
raft proposals), which is what makes pipelined allocation fast.

Errors are translated where they enter: a refused or timed-out connection is
`KvstoreUnavailable`; an answer etcd gave but refused (an unknown lease, a bad
request) is `KvstoreError` with etcd's message. Nothing here knows about
identities; `flagella.identity._etcd` builds on `txn`, `range`, `lease_*`.

Why not a PyPI client: this needs only the stdlib and no new dependency. The
maintained asyncio client aetcd 1.0.0 (grpc) was checked late, in a throwaway
venv: it works with grpcio 1.85 / protobuf 7 (put, get, lease against etcd
3.4). Moving this module onto it would save etcd the gateway's JSON work.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from flagella.errors import FlagellaError


class KvstoreError(FlagellaError):
    """etcd answered, but refused the request."""


class KvstoreUnavailable(KvstoreError):
    """etcd could not be reached (refused, reset, or no answer in time)."""


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return b64(bytes(raw))
        raw.pop()
    return b64(b"\0")


def kv_pairs(response: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(key, value, mod_revision) of a range response."""
    return [
        (unb64(kv["key"]), unb64(kv.get("value", "")), int(kv.get("mod_revision", 0)))
        for kv in response.get("kvs", [])
    ]


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class EtcdClient:
    """JSON-gateway client with a pool of up to ``connections`` HTTP/1.1 connections."""

    def __init__(
        self, endpoints: Sequence[str], *, timeout_s: float = 2.0, connections: int = 16
    ) -> None:
        if not endpoints:
            raise KvstoreError("kvstore.endpoints: at least one endpoint is needed")
        self._addrs: list[tuple[str, int]] = []
        for ep in endpoints:
            url = urlsplit(ep if "://" in ep else f"http://{ep}")
            if url.scheme != "http" or not url.hostname or not url.port:
                raise KvstoreError(f"kvstore.endpoints: {ep!r} must be http://HOST:PORT")
            self._addrs.append((url.hostname, url.port))
        self.timeout_s = timeout_s
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(connections)
        self._next = 0

    async def close(self) -> None:
        while self._idle:
            _r, w = self._idle.pop()
            w.close()

    async def _connect(self) -> _Conn:
        last: Exception | None = None
        for _ in range(len(self._addrs)):
            host, port = self._addrs[self._next % len(self._addrs)]
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout_s)
            except (TimeoutError, OSError) as exc:
                last = exc
                self._next += 1
        raise KvstoreUnavailable(f"etcd unreachable at {self._addrs}: {last or 'timeout'}")

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>``; the decoded JSON answer."""
        payload = json.dumps(body).encode()
        request = (
            f"POST /v3/{path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        async with self._slots:
            while True:
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._connect()
                try:
                    status, data = await asyncio.wait_for(self._exchange(conn, request), self.timeout_s)
                    break
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    conn[1].close()
                    while self._idle:  # the others are likely dead too; reconnect lazily
                        self._idle.pop()[1].close()
                    if reused and isinstance(exc, (ConnectionError, asyncio.IncompleteReadError)):
                        continue  # a kept-alive connection the server closed: once more, fresh
                    raise KvstoreUnavailable(f"etcd {path}: {type(exc).__name__} {exc}".strip()) from None
            self._idle.append(conn)
        try:
            answer: dict[str, Any] = json.loads(data) if data else {}
        except ValueError:
            raise KvstoreError(f"etcd {path}: answer is not JSON: {data[:80]!r}") from None
        if status != 200 or "error" in answer:
            raise KvstoreError(f"etcd {path}: {answer.get('error') or answer.get('message') or status}")
        return answer

    @staticmethod
    async def _exchange(conn: _Conn, request: bytes) -> tuple[int, bytes]:
        reader, writer = conn
        writer.write(request)
        await writer.drain()
        status_line = await reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        length = -1
        chunked = False
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, await reader.readexactly(max(length, 0))
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, bytes(body)
            body += chunk[:-2]

    # -- the calls the backend uses -------------------------------------------

    async def range(
        self, key: str, *, prefix: bool = False, count_only: bool = False, keys_only: bool = False,
        min_mod_revision: int = 0,
    ) -> dict[str, Any]:
        """``min_mod_revision``: only keys last modified at that revision or later (etcd
        applies it to the keys it returns: with ``count_only`` the count is not filtered)."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        if count_only:
            body["count_only"] = True
        if keys_only:
            body["keys_only"] = True
        if min_mod_revision:
            body["min_mod_revision"] = str(min_mod_revision)
        return await self.call("kv/range", body)

    async def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]], failure: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return await self.call("kv/txn", {"compare": compare, "success": success, "failure": failure})

    async def lease_grant(self, ttl_s: int) -> int:
        return int((await self.call("lease/grant", {"TTL": ttl_s}))["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """The lease's remaining TTL; 0 when etcd no longer has it."""
        answer = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease: int) -> None:
        await self.call("kv/lease/revoke", {"ID": str(lease)})


# -- txn building blocks (JSON-gateway spelling of etcdserverpb) ---------------


def absent(key: str) -> dict[str, Any]:
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def value_is(key: str, value: str) -> dict[str, Any]:
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


def mod_is(key: str, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def put(key: str, value: str, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def get(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def responses(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-operation results of a txn answer, unwrapped."""
    out: list[dict[str, Any]] = []
    for item in answer.get("responses", []):
        out.append(next(iter(item.values())) if item else {})
    return out
