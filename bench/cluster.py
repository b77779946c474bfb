"""Cluster-state benchmark: what one ``kvstore-sync`` run costs at scale.

    PYTHONPATH=src .venv/bin/python bench/cluster.py [--entries 10000 --nodes 100]

A node polls the whole cluster prefix every ``kvstore.sync_interval_s`` (NOTES.md,
"Polling, not watch"); this measures the parts of one run, side by side:

- publish: one agent writes ``--entries`` endpoint entries (its first run after a
  restart), txns of 64 puts, to a real etcd 3.4 (Debian ``etcd-server`` on loopback);
- read: one range over the prefix holding those entries (etcd + JSON gateway + decode);
- diff: the pure `ClusterState.replace` of that read, first (everything new), again
  unchanged (the steady state), and with one entry changed;
- quiet check: `ClusterSync.changed_since`, the two small reads (names of keys put since
  the read's revision, and the key count) with which a run in which nothing changed
  stops instead of reading and diffing (side by side with read + unchanged diff);
- extras: `ClusterState.extras` (addresses and named ports per identity).

The entries are spread over ``--nodes`` node names (the agent publishes them as its
own and as other nodes', which the reading node treats alike).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.etcd import EtcdServer  # noqa: E402

from flagella.agent.kvstore import ClusterSync  # noqa: E402
from flagella.identity import EtcdBackend  # noqa: E402
from flagella.ipcache import ClusterState  # noqa: E402


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--nodes", type=int, default=100)
    args = ap.parse_args()
    prefix = "bench/cluster"
    desired = {
        f"{prefix}/ip/node{i % args.nodes}/10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}": json.dumps(
            {"identity": 256 + i % 2000, "labels": f"k8s:app=a{i % 2000}"}
        )
        for i in range(args.entries)
    }
    etcd = EtcdServer().start()
    backend = EtcdBackend([etcd.endpoint], node="bench", prefix="bench/identities")
    try:
        sync = ClusterSync(backend, prefix)
        (_n, took_publish) = timed(lambda: sync.publish(desired, []))
        (rows, revision), took_read = timed(sync.read_at)
        quiet, took_check = timed(lambda: sync.changed_since(revision, len(rows)))
        assert quiet is False
        pairs = [(k, v) for k, v, _lease in rows]
        state = ClusterState("reader", prefix)
        _c, took_first = timed(lambda: state.replace(pairs))
        _c, took_same = timed(lambda: state.replace(pairs))
        changed = list(pairs)
        changed[0] = (changed[0][0], json.dumps({"identity": 4000, "labels": "k8s:app=x"}))
        change, took_one = timed(lambda: state.replace(changed))
        _e, took_extras = timed(state.extras)
        assert len(change.prefixes) == 1 and len(rows) == args.entries
    finally:
        backend.close()
        etcd.close()
    n = args.entries
    print(f"entries {n} over {args.nodes} nodes")
    print(f"publish (txns of 64 puts)   {took_publish * 1000:8.1f} ms  {n / took_publish:10.0f} entries/s")
    print(f"read (one range)            {took_read * 1000:8.1f} ms  {n / took_read:10.0f} entries/s")
    print(f"diff, first read            {took_first * 1000:8.1f} ms")
    print(f"diff, unchanged             {took_same * 1000:8.1f} ms")
    print(f"diff, one entry changed     {took_one * 1000:8.1f} ms")
    print(f"extras                      {took_extras * 1000:8.1f} ms")
    steady = took_read + took_same
    print(f"quiet check (2 small reads) {took_check * 1000:8.1f} ms  vs read + unchanged diff "
          f"{steady * 1000:.1f} ms: {steady / took_check:.0f}x less per quiet run")


if __name__ == "__main__":
    main()
