"""`flagella proxy status` through the agent's socket, with a live xDS stream."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from typer.testing import CliRunner

from flagella.agent.core import AgentCore
from flagella.agent.server import AgentServer
from flagella.agent.settings import AgentSettings
from flagella.cli._app import app
from flagella.datapath.port import MemoryDatapath
from flagella.xds import XdsServer, XdsSettings
from flagella.xds.types import EXTENSION_CONFIG

from .helpers import Client, rbac_filter


def test_proxy_status_lists_a_connected_node(tmp_path: Path) -> None:
    core = AgentCore(AgentSettings(state_dir=str(tmp_path / "state")), MemoryDatapath())
    core.restore()
    xds = XdsServer(XdsSettings(unix_socket=tmp_path / "xds.sock"))
    server = AgentServer(core, xds=xds)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    api = str(tmp_path / "api.sock")

    async def start() -> asyncio.Server:
        listener = await server.start_api(api)
        await xds.start()
        xds.set_resources(EXTENSION_CONFIG, {"rbac": rbac_filter("rbac", "/a")})
        return listener

    listener = asyncio.run_coroutine_threadsafe(start(), loop).result(30)

    async def connect_and_nack() -> Client:
        client = Client(str(tmp_path / "xds.sock"), node="envoy-7")
        await client.request(EXTENSION_CONFIG, ["rbac"])
        response = await client.recv()
        await client.request(EXTENSION_CONFIG, ["rbac"], nonce=response.nonce, error="invalid RBAC: boom")
        await asyncio.sleep(0.3)
        return client

    client_loop = asyncio.new_event_loop()
    client = client_loop.run_until_complete(connect_and_nack())
    try:
        runner = CliRunner()
        as_json = runner.invoke(app, ["proxy", "status", "--socket", api, "--output", "json"])
        assert as_json.exit_code == 0, as_json.output
        [row] = json.loads(as_json.output)
        assert row["node"] == "envoy-7" and row["stream"] == "ads"
        [ecds] = row["types"]
        assert ecds["type_url"] == EXTENSION_CONFIG
        assert ecds["last_error"] == "invalid RBAC: boom" and ecds["version_acked"] == ""
        as_text = runner.invoke(app, ["proxy", "status", "--socket", api])
        assert as_text.exit_code == 0, as_text.output
        assert "envoy-7" in as_text.output and "NACKED" in as_text.output
        assert "last NACK: invalid RBAC: boom" in as_text.output
    finally:
        client_loop.run_until_complete(client.close())
        client_loop.close()
        asyncio.run_coroutine_threadsafe(xds.stop(0), loop).result(10)
        loop.call_soon_threadsafe(listener.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        server.trace_worker.shutdown(wait=False)
