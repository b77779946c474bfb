"""The fine protocol rules, against an in-process grpc client over a real unix socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2 as d

from flagella.errors import InputError
from flagella.xds import FakeClock, XdsNack, XdsServer, XdsSettings
from flagella.xds.server import SERVICES
from flagella.xds.types import CLUSTER, EXTENSION_CONFIG, LISTENER, short_name

from .helpers import Client, cluster, names_of, rbac_filter


@asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[tuple[XdsServer, FakeClock, str]]:
    clock = FakeClock()
    sock = tmp_path / "xds.sock"
    server = XdsServer(XdsSettings(unix_socket=sock, ack_timeout=10), clock=clock)
    await server.start()
    try:
        yield server, clock, str(sock)
    finally:
        await server.stop(0)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.005)


async def push(clock: FakeClock) -> None:
    """Let the debouncer's quiet period pass, on the fake clock."""
    await settle()
    clock.advance(0.1)
    await settle()


def run(test: Callable[[Path], Awaitable[None]]) -> Callable[[Path], None]:
    def wrapper(tmp_path: Path) -> None:
        asyncio.run(asyncio.wait_for(test(tmp_path), 30))

    wrapper.__name__ = test.__name__
    return wrapper


def test_socket_mode(tmp_path: Path) -> None:
    async def body() -> None:
        async with running(tmp_path) as (_, _, sock):
            assert Path(sock).stat().st_mode & 0o777 == 0o660

    asyncio.run(body())


@run
async def test_ack_resolves_completion_and_status(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, clock, sock):
        server.set_resources(CLUSTER, {"c1": cluster("c1")})
        client = Client(sock)
        await client.request(CLUSTER)  # wildcard: never named anything
        first = await client.recv()
        assert names_of(first) == ["c1"]
        await client.ack(first)
        await settle()
        done = server.set_resources(CLUSTER, {"c1": cluster("c1"), "c2": cluster("c2")})
        await push(clock)
        second = await client.recv()
        assert names_of(second) == ["c1", "c2"]  # CDS is full-state
        assert not done.done()
        await client.ack(second)
        await asyncio.wait_for(done, 5)
        [row] = server.status()
        [cds] = row.types
        assert row.node == "node-1"
        assert cds.version_acked == cds.version_sent == second.version_info
        assert cds.last_ack_time is not None
        registry = server.metrics.registry
        assert registry.get_sample_value("flagella_xds_pushes_total", {"type": "CDS"}) == 2
        assert registry.get_sample_value("flagella_xds_acks_total", {"type": "CDS"}) == 2
        assert registry.get_sample_value("flagella_xds_push_latency_seconds_count", {"type": "CDS"}) == 2
        await client.close()


@run
async def test_stale_nonce_is_ignored(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, clock, sock):
        server.set_resources(EXTENSION_CONFIG, {"rbac": rbac_filter("rbac", "/a")})
        client = Client(sock)
        await client.request(EXTENSION_CONFIG, ["rbac"])
        old = await client.recv()
        server.set_resources(EXTENSION_CONFIG, {"rbac": rbac_filter("rbac", "/b")})
        await push(clock)
        new = await client.recv()
        assert new.nonce != old.nonce
        # A NACK carrying the old nonce is stale: ignored whole, no error recorded, nothing parked.
        await client.request(EXTENSION_CONFIG, ["rbac"], nonce=old.nonce, error="stale complaint")
        await settle()
        [row] = server.status()
        assert row.types[0].last_error == ""
        assert row.types[0].phase == "sent"
        await client.ack(new, ["rbac"])
        await settle()
        assert server.status()[0].types[0].version_acked == new.version_info
        await client.close()


@run
async def test_unsubscribe_and_resubscribe(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, clock, sock):
        server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a"), "b": rbac_filter("b", "/b")})
        client = Client(sock)
        await client.request(EXTENSION_CONFIG, ["a"])
        first = await client.recv()
        assert names_of(first) == ["a"]
        await client.ack(first, ["a"])
        await client.request(EXTENSION_CONFIG, [], nonce=first.nonce, version=first.version_info)
        await settle()
        server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a2"), "b": rbac_filter("b", "/b")})
        await push(clock)
        assert await client.silent()
        await client.request(EXTENSION_CONFIG, ["a", "b"], nonce=first.nonce, version=first.version_info)
        again = await client.recv()
        assert names_of(again) == ["a", "b"]
        await client.close()


@run
async def test_wildcard_only_for_listeners_and_clusters(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, _, sock):
        server.set_resources(CLUSTER, {"c1": cluster("c1"), "c2": cluster("c2")})
        server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a")})
        client = Client(sock)
        await client.request(EXTENSION_CONFIG, [])
        assert await client.silent()
        await client.request(CLUSTER, [])
        assert names_of(await client.recv()) == ["c1", "c2"]
        named = Client(sock, node="node-2")
        await named.request(CLUSTER, ["c2"])
        assert names_of(await named.recv()) == ["c2"]
        await client.close()
        await named.close()


@run
async def test_debounce_quiet_and_max(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, clock, sock):
        server.set_resources(CLUSTER, {"c0": cluster("c0")})
        client = Client(sock)
        await client.request(CLUSTER)
        await client.ack(await client.recv())
        await settle()
        pushes = server.pushes_done
        server.update(CLUSTER, {"c1": cluster("c1")})
        await settle()
        clock.advance(0.06)
        server.update(CLUSTER, {"c2": cluster("c2")})  # restarts the 100 ms quiet period
        await settle()
        clock.advance(0.06)
        assert await client.silent(0.1)
        clock.advance(0.05)
        got = await client.recv()
        assert names_of(got) == ["c0", "c1", "c2"]  # both changes in one push
        assert server.pushes_done == pushes + 1
        await client.ack(got)
        # A change every 50 ms never goes quiet; the 10 s bound still pushes.
        for i in range(199):
            server.update(CLUSTER, {f"x{i}": cluster(f"x{i}")})
            await asyncio.sleep(0)
            clock.advance(0.05)
        await settle()
        assert server.pushes_done == pushes + 1
        server.update(CLUSTER, {"last": cluster("last")})
        await asyncio.sleep(0.01)
        clock.advance(0.05)
        await settle()
        assert server.pushes_done == pushes + 2
        assert len(names_of(await client.recv())) == 3 + 200
        await client.close()


@run
async def test_nack_parks_until_content_changes(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, clock, sock):
        server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a")})
        client = Client(sock)
        await client.request(EXTENSION_CONFIG, ["a"])
        good = await client.recv()
        await client.ack(good, ["a"])
        await settle()
        done = server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/bad")})
        await push(clock)
        bad = await client.recv()
        await client.request(EXTENSION_CONFIG, ["a"], nonce=bad.nonce, version=good.version_info, error="boom: invalid")
        with pytest.raises(XdsNack, match="boom: invalid"):
            await asyncio.wait_for(done, 5)
        row = server.status()[0].types[0]
        assert row.last_error == "boom: invalid"
        assert row.version_acked == good.version_info
        assert row.phase == "nacked"
        assert server.metrics.registry.get_sample_value("flagella_xds_nacks_total", {"type": "ECDS"}) == 1
        # Envoy's next request (same names) does not trigger a resend loop, nor does a push of nothing new.
        await client.request(EXTENSION_CONFIG, ["a"], nonce=bad.nonce, version=good.version_info)
        await push(clock)
        assert await client.silent()
        # New content un-parks.
        fixed = server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/fixed")})
        await push(clock)
        resent = await client.recv()
        assert resent.version_info not in (bad.version_info, good.version_info)
        await client.ack(resent, ["a"])
        await asyncio.wait_for(fixed, 5)
        await client.close()


@run
async def test_push_order_and_clusters_removed_last(tmp_path: Path) -> None:
    from envoy.config.listener.v3 import listener_pb2

    async with running(tmp_path) as (server, clock, sock):
        server.set_resources(CLUSTER, {"old": cluster("old")})
        server.set_resources(LISTENER, {"l1": listener_pb2.Listener(name="l1")})
        server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a")})
        client = Client(sock)
        await client.request(LISTENER)
        await client.request(EXTENSION_CONFIG, ["a"])
        await client.request(CLUSTER)
        seen = {}
        for _ in range(3):
            r = await client.recv()
            seen[r.type_url] = r
        for r in seen.values():
            await client.ack(r, ["a"] if r.type_url == EXTENSION_CONFIG else None)
        await settle()
        server.set_resources(CLUSTER, {"new": cluster("new")})
        server.set_resources(LISTENER, {"l2": listener_pb2.Listener(name="l2")})
        server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/b")})
        await push(clock)
        order = [await client.recv() for _ in range(4)]
        assert [r.type_url for r in order] == [CLUSTER, LISTENER, EXTENSION_CONFIG, CLUSTER]
        assert names_of(order[0]) == ["new", "old"]
        assert names_of(order[3]) == ["new"]
        await client.close()


@run
async def test_delta_and_sotw_same_result(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, clock, sock):
        server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a"), "b": rbac_filter("b", "/b")})
        sotw, delta = Client(sock, node="s"), Client(sock, delta=True, node="d")
        await sotw.request(EXTENSION_CONFIG, ["a", "b", "missing"])
        await delta.request(EXTENSION_CONFIG, ["a", "b", "missing"])
        s1, d1 = await sotw.recv(), await delta.recv()
        assert isinstance(d1, d.DeltaDiscoveryResponse)
        assert names_of(s1) == names_of(d1) == ["a", "b"]
        assert list(d1.removed_resources) == ["missing"]  # delta says "does not exist"
        assert {a.value for a in s1.resources} == {r.resource.value for r in d1.resources}
        await sotw.ack(s1, ["a", "b", "missing"])
        await delta.request(EXTENSION_CONFIG, nonce=d1.nonce)
        await settle()
        server.update(EXTENSION_CONFIG, {"b": rbac_filter("b", "/b2")}, removals=["a"])
        await push(clock)
        s2, d2 = await sotw.recv(), await delta.recv()
        assert names_of(s2) == ["b"]
        assert names_of(d2) == ["b"] and list(d2.removed_resources) == ["a"]
        assert s2.resources[0].value == d2.resources[0].resource.value
        # Unsubscribe-only delta request: no answer needed.
        await delta.request(EXTENSION_CONFIG, nonce=d2.nonce, unsubscribe=["b"])
        assert await delta.silent(), delta.unexpected
        await sotw.close()
        await delta.close()


@pytest.mark.parametrize("service", sorted(SERVICES))
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_every_service_answers_its_type(tmp_path: Path, service: str, delta: bool) -> None:
    """Per-type services take requests without a type URL; ADS needs it."""
    sotw_method, delta_method, fixed = SERVICES[service]
    type_url = fixed or EXTENSION_CONFIG

    async def body() -> None:
        async with running(tmp_path) as (server, _, sock):
            server.set_resources(type_url, {"r": rbac_filter("r", "/")})
            channel = grpc.aio.insecure_channel(f"unix:{sock}")
            request_type = d.DeltaDiscoveryRequest if delta else d.DiscoveryRequest
            response_type = d.DeltaDiscoveryResponse if delta else d.DiscoveryResponse
            call = channel.stream_stream(
                f"/{service}/{delta_method if delta else sotw_method}",
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )()
            request = request_type(type_url="" if fixed else type_url)
            request.node.id = "n"
            getattr(request, "resource_names_subscribe" if delta else "resource_names").append("r")
            await call.write(request)
            response = await asyncio.wait_for(call.read(), 5)
            assert response.type_url == type_url
            assert len(response.resources) == 1
            [row] = server.status()
            assert row.stream == ("ads" if fixed is None else short_name(fixed).lower()) + ("-delta" if delta else "")
            call.cancel()
            await channel.close()

    asyncio.run(asyncio.wait_for(body(), 30))


@asynccontextmanager
async def one_stream_not_reading(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[XdsServer, Client, Client]]:
    """A server with a 16 MiB CDS answer (it fills the flow-control windows); ``stalled``
    has asked for it and not read it, ``other`` has just asked."""
    sock = tmp_path / "xds.sock"
    server = XdsServer(XdsSettings(unix_socket=sock, **settings))
    await server.start()

    def channel() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"unix:{sock}", options=[("grpc.max_receive_message_length", -1)])

    stalled = Client(str(sock), node="stalled", channel=channel())
    other = Client(str(sock), node="other", channel=channel())
    try:
        server.set_resources(CLUSTER, {f"c{i:05}-{'x' * 1000}": cluster(f"c{i:05}-{'x' * 1000}")
                                       for i in range(16_000)})
        await stalled.request(CLUSTER)  # answered at once, never read (yet)
        await settle()
        await other.request(CLUSTER)
        yield server, stalled, other
    finally:
        await stalled.close()
        await other.close()
        await server.stop(0)


@pytest.mark.parametrize("bound", [1, 2])
def test_pushes_run_with_bounded_concurrency(tmp_path: Path, bound: int) -> None:
    """``max_concurrent_pushes`` streams encode and write at once. A stream whose Envoy
    does not read holds one slot (for ``write_timeout``, 10 s by default): with one slot
    the next stream waits for it, with two it is answered at once."""

    async def body() -> None:
        async with one_stream_not_reading(tmp_path, max_concurrent_pushes=bound) as (_, stalled, other):
            if bound == 1:
                assert await other.silent(1.0)  # waits for the slot the stalled stream holds
                assert len((await stalled.recv(30)).resources) == 16_000  # frees it
            assert len((await other.recv(30)).resources) == 16_000

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_stream_that_stops_reading_gives_its_slot_back(tmp_path: Path) -> None:
    """The attack a pod with the socket can make: subscribe, then never read. With one
    push slot it would hold it, and no other Envoy would get another update. After
    ``write_timeout`` it gives the slot back (counted): the next Envoy is answered while
    the stalled one still has not read, and the stalled one loses nothing when it does."""

    async def body() -> None:
        async with one_stream_not_reading(tmp_path, max_concurrent_pushes=1, write_timeout=1.0) as (
            server, stalled, other,
        ):
            assert len((await other.recv(30)).resources) == 16_000
            assert server.metrics.stalled._value.get() == 1
            assert sorted(row.node for row in server.status()) == ["other", "stalled"]
            assert len((await stalled.recv(30)).resources) == 16_000

    asyncio.run(asyncio.wait_for(body(), 60))


def test_write_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="xds.write_timeout"):
        XdsSettings(unix_socket=tmp_path / "x.sock", write_timeout=0)


@pytest.mark.parametrize("delta", [False, True])
def test_a_change_to_names_a_stream_did_not_ask_for_is_no_change_for_it(tmp_path: Path, delta: bool) -> None:
    """Two sidecars on one server, each subscribed to its own filter. A change to one's
    filter is sent to it alone: the other gets nothing (SotW used to re-send it its
    unchanged filter under the set's new version), and the completion waits for no ACK
    of the other (in delta it used to wait for one that never came, until ack_timeout)."""

    async def body() -> None:
        async with running(tmp_path) as (server, clock, sock):
            server.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a"), "b": rbac_filter("b", "/b")})
            clients = {name: Client(sock, delta=delta, node=f"sidecar-{name}") for name in "ab"}
            for name, client in clients.items():
                await client.request(EXTENSION_CONFIG, names=[name])
                first = await client.recv()
                assert names_of(first) == [name]
                await client.ack(first, names=[name])
            await settle()
            done = server.update(EXTENSION_CONFIG, {"b": rbac_filter("b", "/b2")})
            await push(clock)
            changed = await clients["b"].recv()
            assert names_of(changed) == ["b"]
            assert await clients["a"].silent(0.5)
            await clients["b"].ack(changed, names=["b"])
            await asyncio.wait_for(done, 5)  # ack_timeout is 10 s: no waiting on sidecar-a
            registry = server.metrics.registry
            assert registry.get_sample_value("flagella_xds_pushes_total", {"type": "ECDS"}) == 3
            for client in clients.values():
                await client.close()

    asyncio.run(asyncio.wait_for(body(), 30))
