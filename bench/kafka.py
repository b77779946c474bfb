"""Kafka benchmark: what enforcing Kafka policy costs a producer.

    .venv/bin/python bench/kafka.py [--quick] [--messages N] [--samples N] [--repetitions N]
                                    [--paths direct,relay,envoy]

Theory of operation
-------------------
One Tansu broker (memory storage) on loopback, and confluent-kafka
(librdkafka) producers sending 1 KB messages with acks=1 to one topic, in turn:

* ``direct``: straight to the broker;
* ``relay``: through a relay on loopback that runs the sans-IO Kafka
  processor (`flagella.proxy.kafka.KafkaConnection`) with the Kafka guide's
  producer policy (role produce on two topics). The relay is a separate
  process (`tests.support.kafka_relay` in it), so its Python does not share a
  GIL with the client; it measures the processor plus one asyncio hop;
* ``envoy``: through the real Envoy with the node proxy's Kafka chain
  (network RBAC identity -> network ext_proc -> tcp_proxy), the ext_proc
  service (`flagella.proxy.kafka_envoy.KafkaExtProcService`) on a grpc.aio
  server in another process (`tests.support.kafka_envoy`), same policy:
  the enforced path as deployed.

Throughput: N messages produced asynchronously (librdkafka batching, its
defaults), timed from the first produce to the last delivery report. During
it, the CPU time of the enforcing process tree (the relay's process; the
ext_proc service's process and its Envoy) is read from /proc: CPU per 1,000
messages is the least noisy figure on a shared machine, since it does not
depend on what else gets the cores. Latency:
one message at a time (``linger.ms=0``), produce to delivery report, p50/p99.
Each repetition runs every path back to back (order alternating), so drift
and the shared machine's load hit them alike. Medians over repetitions are
reported, and the targets are judged on *paired* figures: each repetition's
enforced throughput over that same repetition's direct throughput, and its p99
minus that repetition's direct p99, as median and range over repetitions
(on a shared, noisy machine the range is the honest figure).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ itself off the path: bench/xds.py would shadow the xds protos Envoy's protos import.
sys.path[:] = [str(ROOT / "src"), str(ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"
]

from confluent_kafka import Producer  # noqa: E402
from tests.support.kafka_broker import broker_with_topics  # noqa: E402

from flagella.policy.api import KAFKA_ROLES, KafkaRule  # noqa: E402
from flagella.policy.mapstate import L7Policy  # noqa: E402

TOPIC = "empire-announce"
POLICY = L7Policy("kafka", kafka=frozenset({
    KafkaRule(KAFKA_ROLES["produce"], topic="empire-announce"),
    KafkaRule(KAFKA_ROLES["produce"], topic="deathstar-plans"),
}))
PAYLOAD = b"x" * 1024


def _relay_process(broker: tuple[str, int], ready: mp.Queue, stop: mp.Event) -> None:  # type: ignore[type-arg]
    from tests.support.kafka_relay import KafkaRelay

    from flagella.proxy.kafka import KafkaCodec

    with KafkaRelay(broker, 1001, POLICY, KafkaCodec()) as relay:
        ready.put(relay.port)
        stop.wait()
        ready.put((len(relay.log.records), relay.log.closes))


def _envoy_process(broker: tuple[str, int], ready: mp.Queue, stop: mp.Event) -> None:  # type: ignore[type-arg]
    from tests.support.kafka_envoy import Pod, kafka_envoy

    from flagella.proxy.kafka import KafkaCodec
    from flagella.proxy.kafka_envoy import tune_allocator

    tune_allocator()  # as the agent does at start

    pods = {"producer": Pod(1001, POLICY, "127.0.0.1")}
    with kafka_envoy(broker, pods, KafkaCodec(), relays=False) as env:
        ready.put(env.port)
        stop.wait()
        ready.put((len(env.records), env.service.closes))


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the service's Envoy)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (Linux /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def throughput(address: str, n: int) -> float:
    producer = Producer({"bootstrap.servers": address, "acks": 1})
    producer.produce(TOPIC, b"warm-up")
    producer.flush(30)
    done = 0
    failed = 0

    def report(err: object, _msg: object) -> None:
        nonlocal done, failed
        done += 1
        failed += err is not None

    start = time.perf_counter()
    for _ in range(n):
        while True:
            try:
                producer.produce(TOPIC, PAYLOAD, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.001)
        producer.poll(0)
    producer.flush(120)
    elapsed = time.perf_counter() - start
    if done != n or failed:
        raise RuntimeError(f"{address}: {done}/{n} delivered, {failed} failed")
    return n / elapsed


def latencies(address: str, n: int) -> list[float]:
    producer = Producer({"bootstrap.servers": address, "acks": 1, "linger.ms": 0})
    producer.produce(TOPIC, b"warm-up")
    producer.flush(30)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        producer.produce(TOPIC, PAYLOAD)
        if producer.flush(10):
            raise RuntimeError(f"{address}: a message was not delivered")
        out.append((time.perf_counter() - start) * 1000)
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (smoke test)")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--samples", type=int, default=2_000)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--paths", default="direct,relay,envoy",
                        help="comma-separated subset of direct,relay,envoy (direct is always run)")
    args = parser.parse_args()
    paths = {p.strip() for p in args.paths.split(",")} | {"direct"}
    if not paths <= {"direct", "relay", "envoy"}:
        parser.error(f"unknown path in --paths {args.paths!r}")
    if args.quick:
        args.messages, args.samples, args.repetitions = 5_000, 300, 2

    ctx = mp.get_context("spawn")
    with broker_with_topics([TOPIC, "deathstar-plans"]) as broker:
        stop = ctx.Event()
        workers = {}
        for name, target in (("relay", _relay_process), ("envoy", _envoy_process)):
            if name not in paths:
                continue
            queue = ctx.Queue()
            proc = ctx.Process(target=target, args=(broker, queue, stop), daemon=True)
            proc.start()
            workers[name] = (proc, queue)
        addresses = {"direct": f"{broker[0]}:{broker[1]}"}
        for name, (_proc, queue) in workers.items():
            addresses[name] = f"127.0.0.1:{queue.get(timeout=60)}"
        rates: dict[str, list[float]] = {k: [] for k in addresses}
        lat: dict[str, list[float]] = {k: [] for k in addresses}
        p99s: dict[str, list[float]] = {k: [] for k in addresses}
        trees = {name: _descendants(proc.pid) for name, (proc, _q) in workers.items()
                 if proc.pid is not None}
        cpu_ms: dict[str, list[float]] = {k: [] for k in workers}  # per 1,000 messages
        judged = {}
        try:
            for rep in range(args.repetitions):
                order = list(addresses) if rep % 2 == 0 else list(reversed(addresses))
                for name in order:
                    before = cpu_seconds(trees[name]) if name in trees else 0.0
                    rates[name].append(throughput(addresses[name], args.messages))
                    if name in trees:
                        used = cpu_seconds(trees[name]) - before
                        cpu_ms[name].append(used * 1000 / (args.messages / 1000))
                    sample = latencies(addresses[name], args.samples)
                    lat[name].extend(sample)
                    p99s[name].append(percentile(sample, 99))
                print(f"repetition {rep + 1}: " + ", ".join(
                    f"{k} {rates[k][-1]:,.0f} msg/s p99 {p99s[k][-1]:.3f} ms" for k in addresses
                ), flush=True)
        finally:
            stop.set()
            for name, (proc, queue) in workers.items():
                judged[name] = queue.get(timeout=30)
                proc.join(30)

    print()
    print(f"1 KB messages, acks=1, confluent-kafka {__import__('confluent_kafka').version()}, "
          f"{args.messages} messages x {args.repetitions} repetitions; latency {args.samples} "
          f"one-at-a-time sends per repetition")
    print("| path | throughput (msg/s, median) | MB/s | latency p50 (ms) | p99 (ms, median of reps) |")
    print("|---|---|---|---|---|")
    for k in addresses:
        rate = statistics.median(rates[k])
        print(f"| {k} | {rate:,.0f} | {rate * 1024 / 1e6:.1f} | "
              f"{statistics.median(lat[k]):.3f} | {statistics.median(p99s[k]):.3f} |")
    print()
    for k in workers:
        ratios = [r / d for r, d in zip(rates[k], rates["direct"], strict=True)]
        added = [p - d for p, d in zip(p99s[k], p99s["direct"], strict=True)]
        records, closes = judged[k]
        print(f"{k}: throughput ratio {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}-{max(ratios):.3f}] (target >= 0.6), "
              f"added p99 latency {statistics.median(added):.3f} ms "
              f"[{min(added):.3f}-{max(added):.3f}] (target <= 2 ms), "
              f"added p50 {statistics.median(lat[k]) - statistics.median(lat['direct']):.3f} ms; "
              f"enforcement CPU {statistics.median(cpu_ms[k]):.2f} ms per 1,000 messages "
              f"[{min(cpu_ms[k]):.2f}-{max(cpu_ms[k]):.2f}]; "
              f"{records} requests judged, {len(closes)} connections closed by the processor")


if __name__ == "__main__":
    main()
