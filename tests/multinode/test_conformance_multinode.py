"""The conformance cases across two nodes: each case's pods spread over two agents.

The e2e runner's multi-node option (`tests.support.e2e_harness.MultiNodeCluster`): the
pods of a case are placed on two nodes (agents in node namespaces sharing a real etcd,
`tests.multinode._harness`), each agent gets every policy, and each pod-to-pod probe of
the table is run for real; a pair on different nodes crosses the bridge and is judged by
the receiving node from the identity its ipcache learned through etcd. Every verdict
must hold as on one node. The world is a namespace on the nodes' bridge (`BridgedWorld`)
with the corpus' TEST-NET stand-ins; a probe from the host runs on the destination pod's
node.

Every case with a probe to check runs (not one of only SCTP probes, which this kernel
cannot carry); ``FLAGELLA_MULTINODE_CASES``, a regular expression over case ids, narrows
that down.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from tests.multinode._harness import FABRIC, MultiNode
from tests.support.cases import load_cases
from tests.support.e2e_harness import (
    BridgedWorld,
    MultiNodeCluster,
    NodeHandle,
    prepare_host,
    run_case,
)
from tests.support.e2e_plan import external_map, plan_case
from tests.support.host import netns_names, sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

WORLD_IP = "10.250.0.253"  # the world's address on the nodes' bridge
ALL = load_cases()
EXTERNALS = external_map(ALL)


def _runs_across_nodes(case) -> bool:  # type: ignore[no-untyped-def]
    plan = plan_case(case, EXTERNALS, family=4)
    return any(p.action == "check" for s in plan.steps for p in s.probes)


CASES = [
    c for c in ALL
    if re.search(os.environ.get("FLAGELLA_MULTINODE_CASES", "."), c.id) and _runs_across_nodes(c)
]


@pytest.fixture(scope="module")
def mn_cluster(mn_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNodeCluster]:
    prepare_host()
    workdir = tmp_path_factory.mktemp("mn-e2e")
    logs = workdir / "logs"
    logs.mkdir()
    # The corpus names pods like everyone's e2e runs do: this run's netns get a prefix.
    prefix = f"sys-{os.getpid()}c-"
    mn = MultiNode(workdir, shared_pod_cidr="10.244.0.0/16", proxy=True, pod_netns_prefix=prefix)
    cluster: MultiNodeCluster | None = None
    world: BridgedWorld | None = None
    errors: list[str] = []
    try:
        mn.start()
        serve: set[tuple[int, str]] = set()
        for case in CASES:
            serve |= plan_case(case, EXTERNALS).world_serve
        world = BridgedWorld(sorted(EXTERNALS.values()), serve, logs, FABRIC, "br0", WORLD_IP)
        world.create()
        cluster = MultiNodeCluster([NodeHandle(n.agent, n.netns, n.ip) for n in mn.nodes], logs, world=world)
        yield cluster
    finally:
        if cluster is not None:
            try:
                cluster.close()
            except Exception as exc:
                errors.append(str(exc))
        if world is not None:
            world.destroy()
        errors += mn.close()
        if cluster is not None:
            present = netns_names()
            for name in sorted(n for n in cluster.netns_seen if n.startswith(prefix) and n in present):
                sh("ip", "netns", "del", name, check=False)
                errors.append(f"pod netns {name} was left behind (removed now)")
    assert not errors, errors


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance_across_two_nodes(mn_cluster: MultiNodeCluster, case) -> None:  # type: ignore[no-untyped-def]
    plan = plan_case(case, EXTERNALS, family=4)
    report = run_case(mn_cluster, plan)
    assert report.checked > 0, "no probe ran"
    assert report.ok, report.failure_text()
