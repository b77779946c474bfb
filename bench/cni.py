"""Pod creation through CNI vs through the agent's own API, side by side.

    PYTHONPATH=src:. .venv/bin/python bench/cni.py [--pods 16 --concurrency 8]

Needs root, bcc and ../shared/tools/netguard. One real agent (`tests.system._support.Agent`,
in a node namespace of its own) serves both ways of making a pod ready, each measured until
the pod's policy is in the kernel:

* baseline: ``endpoint.create`` over the API (the agent makes the namespace itself);
* CNI: ``flagella-cni ADD`` as a runtime runs it (a fresh Python process per pod, which
  adopts the namespace the "runtime" made), serially and with ``--concurrency`` at once.

Prints the median and p90 seconds per pod and the pods per second of each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.cni.test_cni_root import INIT_POLICY, Runtime
from tests.system._support import Agent, Cluster, namespace, prepare_host, sweep_stale


def summary(name: str, each: list[float], wall: float) -> None:
    each = sorted(each)
    p90 = each[int(0.9 * (len(each) - 1))]
    print(f"  {name:38s} median {statistics.median(each):6.3f} s   p90 {p90:6.3f} s   {len(each) / wall:6.1f} pods/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    prepare_host()
    sweep_stale()
    agent = Agent(Path(tempfile.mkdtemp(prefix="flagella-bench-cni-")), "cnib")
    agent.start()
    cluster, runtime = Cluster(agent), Runtime(agent)
    ns = namespace("cnib")
    try:
        agent.call("policy.import", {"documents": [INIT_POLICY]})
        print(f"{args.pods} pods each way, concurrency {args.concurrency}")
        times = []
        t0 = time.perf_counter()
        for k in range(args.pods):
            t = time.perf_counter()
            cluster.create(f"api{k}", ns, 10 + k)
            times.append(time.perf_counter() - t)
        summary("baseline: endpoint.create (API)", times, time.perf_counter() - t0)

        rts = [runtime.netns(f"b{k}") for k in range(2 * args.pods)]
        times = []
        t0 = time.perf_counter()
        for k in range(args.pods):
            t = time.perf_counter()
            code, out = runtime.run("ADD", f"s{k}", rts[k], (ns, f"cni{k}"))
            assert code == 0, out
            times.append(time.perf_counter() - t)
        summary("flagella-cni ADD, serial", times, time.perf_counter() - t0)

        times = []
        t0 = time.perf_counter()
        for start in range(0, args.pods, args.concurrency):
            batch = range(start, min(start + args.concurrency, args.pods))
            began = {k: time.perf_counter() for k in batch}
            procs = {k: runtime.start("ADD", f"c{k}", rts[args.pods + k], (ns, f"par{k}")) for k in batch}
            for k, p in procs.items():
                code, out = runtime.finish(p)
                assert code == 0, out
                times.append(time.perf_counter() - began[k])
        summary(f"flagella-cni ADD, {args.concurrency} at once", times, time.perf_counter() - t0)
    finally:
        runtime.close()
        cluster.close()
        agent.close()


if __name__ == "__main__":
    main()
