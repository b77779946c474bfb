"""Identity allocation benchmark: local SQLite vs a real etcd, 1 and 4 agents.

    .venv/bin/python bench/identity.py [--count 10000 --agents 4 --connections 16]

Allocates ``--count`` new identities (distinct label sets
``k8s:app=...;k8s:io.kubernetes.pod.namespace=...``):

- against the local SQLite store (one transaction per identity, serially);
- against a real etcd 3.4 (Debian ``etcd-server``, started here on loopback with
  a temp data dir) from one agent, serially (``connections=1``, the baseline:
  one round trip at a time) on a slice, then pipelined (``--connections``
  requests in flight);
- from ``--agents`` agent processes at once, each allocating its share, all
  started at the same instant; per-agent and aggregate rates.

Each new identity is one etcd txn (two master keys and the node's leased
reference, guarded by compare-on-absence). Then warm lookups: `Allocator.lookup`
of label sets already known (served from the agent's cache).

The agent's own bulk path is measured too: the CIDR identities of a policy of
``--cidrs`` /32s through `Allocator.allocate` one by one (what the agent did
before) and through `Allocator.allocate_many` (what `AgentCore` does now).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flagella.identity import (  # noqa: E402
    MIN_ALLOCATED_ID,
    Allocator,
    EtcdBackend,
    SQLiteBackend,
    labels_key,
)
from flagella.policy.identities import cidr_identity_labels  # noqa: E402
from flagella.policy.labels import LabelSet, parse_labels  # noqa: E402


def label_sets(tag: str, count: int) -> list[LabelSet]:
    return [
        parse_labels(f"k8s:app={tag}-app{i},k8s:io.kubernetes.pod.namespace=ns{i % 50}")
        for i in range(count)
    ]


def warm_lookups(alloc: Allocator, sets: list[LabelSet], rounds: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for labels in sets:
            alloc.lookup(labels)
    return rounds * len(sets) / (time.perf_counter() - start)


def worker(endpoint: str, prefix: str, node: str, count: int, start_at: float, conns: int) -> None:
    keys = [labels_key(s) for s in label_sets(node, count)]
    backend = EtcdBackend([endpoint], node=node, prefix=prefix, connections=conns, timeout_s=10.0)
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.time()
    ids = backend.acquire_many(keys, MIN_ALLOCATED_ID)
    t1 = time.time()
    print(json.dumps({"node": node, "n": len(set(ids)), "start": t0, "end": t1}))
    backend.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--serial-count", type=int, default=1_000)
    ap.add_argument("--cidrs", type=int, default=2_000)
    ap.add_argument("--worker", nargs=5, metavar=("ENDPOINT", "PREFIX", "NODE", "COUNT", "START"))
    args = ap.parse_args()
    if args.worker:
        ep, prefix, node, count, start = args.worker
        worker(ep, prefix, node, int(count), float(start), args.connections)
        return

    from tests.support.etcd import EtcdServer

    results: dict[str, object] = {"count": args.count, "agents": args.agents}
    with tempfile.TemporaryDirectory() as tmp:
        sets = label_sets("sqlite", args.count)
        keys = [labels_key(s) for s in sets]
        sqlite = SQLiteBackend(Path(tmp) / "identities.db")
        t = time.perf_counter()
        for key in keys:
            sqlite.acquire(key, MIN_ALLOCATED_ID)
        results["sqlite_new_per_s"] = round(args.count / (time.perf_counter() - t))
        results["sqlite_warm_lookups_per_s"] = round(warm_lookups(Allocator(sqlite), sets))
        sqlite.close()

    server = EtcdServer().start()
    try:
        serial = EtcdBackend([server.endpoint], node="serial", prefix="bench-serial", connections=1, timeout_s=10.0)
        skeys = [labels_key(s) for s in label_sets("serial", args.serial_count)]
        t = time.perf_counter()
        for key in skeys:
            serial.acquire(key, MIN_ALLOCATED_ID)
        results["etcd_serial_new_per_s"] = round(args.serial_count / (time.perf_counter() - t))
        serial.close()

        one = EtcdBackend(
            [server.endpoint], node="one", prefix="bench-one", connections=args.connections, timeout_s=10.0
        )
        sets = label_sets("one", args.count)
        keys = [labels_key(s) for s in sets]
        t = time.perf_counter()
        ids = one.acquire_many(keys, MIN_ALLOCATED_ID)
        results["etcd_1_agent_new_per_s"] = round(args.count / (time.perf_counter() - t))
        assert len(set(ids)) == args.count
        results["etcd_warm_lookups_per_s"] = round(warm_lookups(Allocator(one), sets))
        one.close()

        for mode in ("one_by_one", "allocate_many"):
            agent = EtcdBackend(
                [server.endpoint], node=mode, prefix=f"bench-cidr-{mode}", connections=args.connections,
                timeout_s=10.0,
            )
            alloc = Allocator(agent)
            cidrs = [cidr_identity_labels(ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.1/32"))
                     for i in range(args.cidrs)]
            t = time.perf_counter()
            ids = alloc.allocate_many(cidrs) if mode == "allocate_many" else [alloc.allocate(c) for c in cidrs]
            results[f"etcd_agent_cidr_identities_{mode}_per_s"] = round(args.cidrs / (time.perf_counter() - t))
            assert len(set(ids)) == args.cidrs
            agent.close()

        share = args.count // args.agents
        start_at = time.time() + 3.0
        procs = [
            subprocess.Popen(
                [
                    sys.executable, __file__, "--connections", str(args.connections), "--worker",
                    server.endpoint, "bench-many", f"agent{i}", str(share), str(start_at),
                ],
                stdout=subprocess.PIPE, env={**os.environ},
            )
            for i in range(args.agents)
        ]
        outs = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
        per_agent = [o["n"] / (o["end"] - o["start"]) for o in outs]
        span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
        results["etcd_n_agents_per_agent_new_per_s"] = [round(r) for r in per_agent]
        results["etcd_n_agents_aggregate_new_per_s"] = round(sum(o["n"] for o in outs) / span)
        check = EtcdBackend([server.endpoint], node="check", prefix="bench-many")
        ids_all = [ident for ident, _key, _refs in check.items()]
        results["etcd_n_agents_distinct_ids"] = len(set(ids_all))
        check.close()
    finally:
        server.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
