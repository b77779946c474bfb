"""Policy engine benchmark: full resolution, then incremental changes.

    .venv/bin/python bench/policy.py [--rules 500 --identities 5000 --endpoints 200 --changes 100]

Builds a synthetic cluster (identities with app/team/tier/namespace labels,
policies that mix L3, L4, L7, CIDR, deny and egress rules), resolves every
endpoint from scratch, then applies policy adds, policy deletes and endpoint
label changes one at a time. Side by side it measures the baseline a
non-incremental engine pays for each change: a full re-resolution.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import structlog

from flagella.datapath.port import MemoryDatapath
from flagella.datapath.realizer import DatapathEnforcer
from flagella.endpoint.lifecycle import State
from flagella.endpoint.model import Endpoint
from flagella.endpoint.regeneration import Pipeline
from flagella.policy.api import parse_policy
from flagella.policy.engine import PolicyEngine
from flagella.policy.identities import cidr_identity_labels, reserved_identity_labels, rule_prefixes
from flagella.policy.labels import k8s_labels
from flagella.policy.resolver import EndpointInfo

NAMESPACES = [f"ns{i}" for i in range(20)]
APPS = [f"app{i}" for i in range(100)]
TEAMS = [f"team{i}" for i in range(25)]
TIERS = ["web", "api", "db", "cache", "batch"]


def identity_labels(i: int):
    return k8s_labels(
        {"app": APPS[i % len(APPS)], "team": TEAMS[(i // 7) % len(TEAMS)], "tier": TIERS[i % len(TIERS)],
         "shard": str(i // len(APPS))},
        NAMESPACES[i % len(NAMESPACES)],
    )


def make_policy(i: int, rnd: random.Random) -> dict:
    ns = rnd.choice(NAMESPACES)
    kind = i % 6
    target = {"matchLabels": {"app": rnd.choice(APPS)}}
    peer = {"matchLabels": {"team": rnd.choice(TEAMS)}}
    port = {"ports": [{"port": str(rnd.choice([80, 443, 8080, 5432, 6379])), "protocol": "TCP"}]}
    if kind == 0:
        ingress = [{"fromEndpoints": [peer], "toPorts": [port]}]
    elif kind == 1:
        ingress = [{"fromEndpoints": [{"matchExpressions": [
            {"key": "tier", "operator": "In", "values": rnd.sample(TIERS, 2)},
            {"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}]}]}]
    elif kind == 2:
        ingress = [{"fromEndpoints": [peer], "toPorts": [{
            "ports": [{"port": "80", "protocol": "TCP"}],
            "rules": {"http": [{"method": "GET", "path": f"/api/v{rnd.randint(1, 3)}/.*"}]}}]}]
    elif kind == 3:
        ingress = [{"fromCIDRSet": [{"cidr": f"198.51.{rnd.randint(0, 255)}.0/24"}], "toPorts": [port]}]
    elif kind == 4:
        ingress = [{"fromEndpoints": [peer], "toPorts": [{"ports": [
            {"port": "30000", "endPort": 30000 + rnd.randint(10, 500), "protocol": "TCP"}]}]}]
    else:
        ingress = [{"fromEntities": ["cluster"]}]
    spec = {"endpointSelector": target, "ingress": ingress,
            "egress": [{"toEndpoints": [{"matchLabels": {"tier": rnd.choice(TIERS)}}]}]}
    if i % 17 == 0:
        spec["ingressDeny"] = [{"fromEndpoints": [{"matchLabels": {"team": rnd.choice(TEAMS)}}]}]
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": f"policy-{i}", "namespace": ns}, "spec": spec}


def build(args, rnd):
    engine = PolicyEngine()
    for ident, labels in reserved_identity_labels().items():
        engine.set_identity(ident, labels)
    for i in range(args.identities):
        engine.set_identity(256 + i, identity_labels(i))
    policies = [parse_policy(make_policy(i, rnd)) for i in range(args.rules)]
    next_id = 256 + args.identities
    for n, net in enumerate(sorted(rule_prefixes(policies), key=str)):
        engine.set_identity(next_id + n, cidr_identity_labels(net))
    endpoints = []
    for e in range(args.endpoints):
        ident = 256 + rnd.randrange(args.identities)
        endpoints.append(EndpointInfo(e + 1, ident, identity_labels(ident - 256),
                                      addresses=frozenset({ipaddress.ip_address(f"10.244.{e // 250}.{e % 250 + 1}")})))
    return engine, policies, endpoints


def cidr_scale(n: int, endpoints: int = 100, pods: int = 5) -> dict[str, object]:
    """A policy of ``n`` CIDRs selecting ``endpoints`` endpoints: import, then ``pods`` new
    pods one after the other (each one's time until the endpoints' maps hold its keys)."""
    nets = [f"198.{18 + i // 65536}.{(i // 256) % 256}.{i % 256}/32" for i in range(n)]
    policy = parse_policy({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "cidrs", "namespace": "default"},
        "spec": {"endpointSelector": {}, "egress": [{"toCIDR": [*nets, "10.244.0.0/16"]}]},
    })
    engine = PolicyEngine()
    for ident, labels in reserved_identity_labels().items():
        engine.set_identity(ident, labels)
    for k in range(endpoints):
        labels = k8s_labels({"app": f"a{k}"}, "default")
        engine.upsert_endpoint(EndpointInfo(k + 1, 300 + k, labels, addresses=frozenset(
            {ipaddress.ip_address(f"10.244.1.{k + 1}"), ipaddress.ip_address(f"fd00:10:244::{k + 1:x}")})))
    t0 = time.perf_counter()
    for i, net in enumerate(sorted(rule_prefixes([policy]), key=str)):
        engine.set_identity(100_000 + i, cidr_identity_labels(net))
    engine.upsert_policies([policy])
    imported = time.perf_counter() - t0
    # The kernel realization over the in-memory datapath twin, driven by the
    # regeneration pipeline as the agent drives it (apply in the loop's executor).
    enforcer = DatapathEnforcer(MemoryDatapath(), 15001, 15002)
    pipeline = Pipeline([enforcer])
    pipeline.start()
    eps = {k + 1: Endpoint(id=k + 1, name=f"a{k}", namespace="default", labels={"app": f"a{k}"},
                           ifindex=1000 + k, identity=300 + k) for k in range(endpoints)}
    for ep in eps.values():
        ep.set_state(State.WAITING_FOR_IDENTITY)  # as the agent's endpoint manager leaves it

    def regenerate(ids: set[int], revision: int) -> float:
        """Hand ``ids`` to the pipeline, wait until realized; return the seconds."""
        t = time.perf_counter()
        for ep_id in sorted(ids & eps.keys()):
            pipeline.request(eps[ep_id], revision, engine.policy(ep_id).snapshot())
        pipeline.advance([ep for ep in eps.values() if ep.id not in ids], revision)
        lagging = pipeline.wait_revision(revision, 60.0)
        assert not lagging, f"{len(lagging)} endpoints did not realize"
        return time.perf_counter() - t

    resolved, realized, affected = [], [], set()
    try:
        realize_all = regenerate(set(eps), 1)
        for j in range(pods):
            labels = k8s_labels({"app": f"new{j}"}, "default")
            t0 = time.perf_counter()
            affected = engine.upsert_endpoint(EndpointInfo(
                10_000 + j, 99_000 + j, labels, addresses=frozenset({ipaddress.ip_address(f"10.244.1.{200 + j}")})))
            resolved.append(time.perf_counter() - t0)
            realized.append(resolved[-1] + regenerate(affected, 2 + j))
            assert any(k.identity == 99_000 + j for k in enforcer.dp.policy), "the new pod's keys are not in the maps"
        entries = len(enforcer.dp.policy)
    finally:
        pipeline.stop()
    return {
        f"cidr{n}_import_s": round(imported, 2),
        f"cidr{n}_first_realization_s": round(realize_all, 2),
        f"cidr{n}_policy_entries": entries,
        f"cidr{n}_new_endpoint_resolved_ms": round(statistics.median(resolved) * 1000, 1),
        f"cidr{n}_new_endpoint_realized_ms": round(statistics.median(realized) * 1000, 1),
        f"cidr{n}_new_endpoint_realized_max_ms": round(max(realized) * 1000, 1),
        f"cidr{n}_new_endpoint_realized_all_ms": [round(t * 1000, 1) for t in realized],
        f"cidr{n}_affected_endpoints": len(affected),
    }


def side_by_side(baseline_src: str, runs: int, n: int, pods: int) -> dict[str, object]:
    """:func:`cidr_scale` with ``baseline_src`` (e.g. main's src) and with this tree's,
    alternately in fresh processes, ``runs`` times each (the machine is shared: noisy)."""
    here = str(Path(__file__).resolve().parents[1] / "src")
    out: dict[str, list[dict[str, object]]] = {"baseline": [], "flagella": []}
    for _ in range(runs):
        for name, src in (("baseline", baseline_src), ("flagella", here)):
            proc = subprocess.run(
                [sys.executable, __file__, "--cidr-only", "--cidr-rules", str(n), "--pods", str(pods)],
                env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True, check=True,
            )
            out[name].append(json.loads(proc.stdout))
    summary: dict[str, object] = {"baseline_src": baseline_src, "runs": runs}
    for key in ("new_endpoint_resolved_ms", "new_endpoint_realized_ms", "new_endpoint_realized_max_ms",
                "first_realization_s"):
        med = {name: statistics.median(float(r[f"cidr{n}_{key}"]) for r in rows)  # type: ignore[arg-type]
               for name, rows in out.items()}
        summary[key] = {**med, "each": {name: [r[f"cidr{n}_{key}"] for r in rows] for name, rows in out.items()},
                        "baseline/flagella": round(med["baseline"] / med["flagella"], 1)}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=500)
    ap.add_argument("--identities", type=int, default=5000)
    ap.add_argument("--endpoints", type=int, default=200)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cidr-rules", type=int, default=5000)
    ap.add_argument("--cidr-only", action="store_true", help="run only the CIDR scale check")
    ap.add_argument("--pods", type=int, default=5, help="new pods in the CIDR scale check")
    ap.add_argument("--baseline-src", help="with --cidr-only: run it side by side with this src "
                    "directory (e.g. /work/main/src), alternately in fresh processes")
    ap.add_argument("--runs", type=int, default=3, help="runs of each side with --baseline-src")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    if args.cidr_only and args.baseline_src:
        print(json.dumps(side_by_side(args.baseline_src, args.runs, args.cidr_rules, args.pods), indent=2))
        return
    if args.cidr_only:
        print(json.dumps(cidr_scale(args.cidr_rules, pods=args.pods), indent=2))
        return
    rnd = random.Random(args.seed)
    engine, policies, endpoints = build(args, rnd)

    t0 = time.perf_counter()
    engine.upsert_policies(policies)
    for ep in endpoints:
        engine.endpoints[ep.id] = ep
    engine.resolve_all()
    full = time.perf_counter() - t0
    entries = sum(len(p.ingress) + len(p.egress) for p in engine.resolved.values())

    incremental, baseline = [], []
    next_policy = args.rules
    next_id = max(engine.identities()) + 1
    for c in range(args.changes):
        op = c % 3
        t0 = time.perf_counter()
        if op == 0:
            engine.upsert_policies([parse_policy(make_policy(next_policy, rnd))])
            next_policy += 1
        elif op == 1:
            key = rnd.choice(list(engine.policies))
            engine.delete_policies([key])
        else:
            ep = rnd.choice(endpoints)
            labels = identity_labels(rnd.randrange(args.identities)) | {
                next(iter(k8s_labels({"canary": str(c)}, "x") - k8s_labels({}, "x")))}
            new = EndpointInfo(ep.id, next_id, labels, addresses=ep.addresses)
            next_id += 1
            engine.upsert_endpoint(new)
        incremental.append(time.perf_counter() - t0)
        if c % 10 == 0:  # the baseline: resolve everything again
            t0 = time.perf_counter()
            engine.resolve_all()
            baseline.append(time.perf_counter() - t0)

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    cidr = cidr_scale(args.cidr_rules, pods=args.pods)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "rules": args.rules, "identities": args.identities, "endpoints": args.endpoints,
        "mapstate_entries": entries,
        "full_resolution_s": round(full, 3),
        "incremental_p50_ms": round(pct(incremental, 0.5) * 1000, 2),
        "incremental_p99_ms": round(pct(incremental, 0.99) * 1000, 2),
        "incremental_max_ms": round(max(incremental) * 1000, 2),
        "baseline_full_reresolve_median_ms": round(statistics.median(baseline) * 1000, 1),
        "speedup_p50_vs_full_reresolve": round(statistics.median(baseline) / pct(incremental, 0.5), 1),
        "peak_rss_mb": round(peak_mb, 1),
        **cidr,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
