"""The agent over the in-memory datapath twin, serving its real unix socket from a thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from flagella.agent.core import AgentCore
from flagella.agent.proxy import NodeProxy
from flagella.agent.server import AgentServer
from flagella.agent.settings import AgentSettings
from flagella.cli import app
from flagella.cli._client import call
from flagella.datapath.port import MemoryDatapath
from flagella.errors import AgentUnavailable


class InProcessAgent:
    """The agent over the in-memory datapath, serving its real socket from a thread."""

    def __init__(self, tmp: Path, enforcer: Any = None, dp: MemoryDatapath | None = None, **settings: Any) -> None:
        """``dp``: the datapath twin of a previous agent (a restart: its pods still exist)."""
        self.envoy = enforcer
        self.dp = dp if dp is not None else MemoryDatapath()
        self.settings = AgentSettings(
            state_dir=str(tmp), metrics_addr="", socket=str(tmp / "agent.sock"), **settings
        )
        # With ``proxy=ProxySettings(enabled=True, ...)``: the node proxy, as the agent composes it.
        self.proxy = NodeProxy(self.settings) if self.settings.proxy.enabled else None
        enforcers = [enforcer] if enforcer else [self.proxy.enforcer] if self.proxy else []
        self.core = AgentCore(self.settings, self.dp, enforcers=enforcers)
        if self.proxy is not None:
            self.core.ipcache_listeners.append(self.proxy.set_ipcache)
        self.core.restore()
        self.server = AgentServer(self.core, proxy=self.proxy)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        ready = threading.Event()

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await self.server.serve(self._stop)

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self.thread.start()
        ready.wait()
        # The socket file appears at bind(), a moment before listen(): ready when it answers.
        while True:
            try:
                call(self.settings.socket_path, "status", {}, timeout=5)
                break
            except AgentUnavailable:
                self.thread.join(0.01)

    def cli(self, *args: str) -> Any:
        return CliRunner().invoke(app, [*args, "--socket", self.settings.socket_path])

    def close(self) -> None:
        """Stop the agent (idempotent: a test may stop it before its fixture does)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join()
        self.core.close()


    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return call(self.settings.socket_path, method, params or {})
