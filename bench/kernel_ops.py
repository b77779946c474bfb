"""Kernel-side operation costs, side by side: what the unit tests used to time.

    PYTHONPATH=src .venv/bin/python bench/kernel_ops.py [--entries 20000 --pods 20]

Needs root, bcc and ../shared/tools/netguard (turned on before any pod exists).
Each line prints a baseline and Flagella's way of doing the same work:

* map writes: one ``bpf(2)`` update per entry (baseline) vs the batched
  ``set_many`` Flagella uses for a whole endpoint's policy, and the batched read;
* datapath load: compile + load (baseline, a first start) vs reusing the pinned
  build (every later start);
* detach of the two tc programs from one veth;
* pod links: ``ensure_pod`` of a new pod vs of an existing one (the idempotent
  path every restart takes), and ``list_pods``.

Moved out of tests/datapath (test_bpf_maps, test_bpf_loader, test_links): speed is
measured here and never asserted in the unit suite.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import statistics
import subprocess
import time
from pathlib import Path

from flagella.datapath.links import LinkSettings, PodNetwork
from flagella.datapath.loader import DatapathSettings, MapSizes, load_datapath, remove_pins
from flagella.datapath.maps import (
    MAP_SPECS,
    DatapathMaps,
    EndpointRow,
    KernelMap,
    MapType,
    PolicyKey,
    Verdict,
)

NETGUARD = Path(__file__).resolve().parents[2] / "shared" / "tools" / "netguard"  # ../shared beside the repo
SMALL = MapSizes(endpoints=64, policy=256, ipcache=256, ct=256, frag4=64, metrics=64, events_pages=1)


def row(what: str, baseline: str, flagella: str) -> None:
    print(f"  {what:34s} {baseline:>22s}   {flagella:>22s}")


def maps_rates(n: int) -> None:
    maps = DatapathMaps._from_backends(
        {name: KernelMap.create(spec) for name, spec in MAP_SPECS.items() if spec.type != MapType.RINGBUF}
    )
    try:
        keys = [PolicyKey(1 + i // 5000, 1000 + i % 5000, False, 6, 80) for i in range(n)]
        t = time.perf_counter()
        for k in keys:
            maps.policy.set(k, Verdict.ALLOW)
        one = n / (time.perf_counter() - t)
        maps.policy.clear()
        t = time.perf_counter()
        maps.policy.set_many(dict.fromkeys(keys, (Verdict.ALLOW, 0)))
        batch = n / (time.perf_counter() - t)
        t = time.perf_counter()
        items = maps.policy.items()
        read = len(items) / (time.perf_counter() - t)
        assert len(items) == n
        nets = [ipaddress.IPv4Network((0x0A000000 + (i << 8), 24)) for i in range(n)]
        t = time.perf_counter()
        for i, net in enumerate(nets):
            maps.ipcache.set(net, 256 + i)
        lpm = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):
            maps.endpoints.set(i + 1, EndpointRow(i, 256 + i))
        eps = n / (time.perf_counter() - t)
    finally:
        maps.close()
    row("policy writes (entries/s)", f"one by one {one:,.0f}", f"set_many {batch:,.0f}")
    row("policy read (entries/s)", "", f"batch {read:,.0f}")
    row("ipcache.set lpm (entries/s)", "", f"{lpm:,.0f}")
    row("endpoints.set (entries/s)", "", f"{eps:,.0f}")


def load_and_detach() -> None:
    pin_dir = Path(f"/sys/fs/bpf/flagella-bench-{secrets.token_hex(3)}")
    ns = f"flbench{secrets.token_hex(3)}"
    settings = DatapathSettings(pin_dir=pin_dir, sizes=SMALL)
    try:
        with load_datapath(settings) as first:
            compile_s = first.load_seconds
        with load_datapath(settings) as second:
            reuse_s = second.load_seconds
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "add", "lxcb", "type", "veth", "peer", "name", "p0"], check=True)
            idx = int(subprocess.run(["ip", "netns", "exec", ns, "cat", "/sys/class/net/lxcb/ifindex"],
                                     check=True, capture_output=True, text=True).stdout)
            second.attach(idx, netns=ns)
            t = time.perf_counter()
            second.detach(idx, netns=ns)
            detach_s = time.perf_counter() - t
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        remove_pins(pin_dir)
    row("datapath start (s)", f"compile+load {compile_s:.3f}", f"pinned reuse {reuse_s:.4f}")
    row("detach one veth (ms)", "", f"{detach_s * 1000:.2f}")


def pod_links(count: int) -> None:
    third = 128 + secrets.randbelow(120)
    settings = LinkSettings(
        ipv4_cidr=ipaddress.IPv4Network(f"10.244.{third}.0/24"),
        ipv6_cidr=ipaddress.IPv6Network(f"fd00:10:244:{third:x}::/112"),
    )
    net = PodNetwork(settings)
    token = secrets.token_hex(3)
    names = [f"flbench-{token}-{i}" for i in range(count)]
    assert settings.ipv6_cidr is not None
    new, existing = [], []
    try:
        for i, name in enumerate(names):
            t = time.perf_counter()
            net.ensure_pod(name, settings.ipv4_cidr[100 + i], settings.ipv6_cidr[100 + i])
            new.append(time.perf_counter() - t)
        for i, name in enumerate(names):
            t = time.perf_counter()
            net.ensure_pod(name, settings.ipv4_cidr[100 + i], settings.ipv6_cidr[100 + i])
            existing.append(time.perf_counter() - t)
        t = time.perf_counter()
        listed = [p for p in net.list_pods() if p.netns in names]
        list_s = time.perf_counter() - t
        assert len(listed) == count
    finally:
        for name in names:
            net.remove_pod(name)
    row("ensure_pod p50 (ms)", f"new {statistics.median(new) * 1000:.2f}",
        f"existing {statistics.median(existing) * 1000:.2f}")
    row(f"list_pods of {count} (ms)", "", f"{list_s * 1000:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--pods", type=int, default=20)
    args = ap.parse_args()
    subprocess.run(["sh", str(NETGUARD), "on"], check=True, capture_output=True)
    row("", "baseline", "flagella")
    maps_rates(args.entries)
    load_and_detach()
    pod_links(args.pods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
