"""kill -9 in the middle of ``endpoint create`` and ``endpoint delete``, then a restart.

The request goes out through the CLI's client (`flagella.cli._client.call`, in a thread: the
CLI process itself needs ~0.3 s of imports before it sends anything, longer than the whole
operation), the agent is SIGKILLed after a seeded random delay, and started again on the same
state dir and pin dir. After every restart the node must be consistent:

* every pod netns and host veth (``fl*`` with the netns in its ifalias) of the test's
  namespace belongs to an endpoint that ``endpoint list`` shows, and every endpoint has both;
* the policy map has entries only for known endpoint ids, the endpoints map rows only for
  known ifindexes (and a row for each), the ipcache exactly the endpoints' addresses;
* identity reference counts equal the number of endpoints holding each identity;
* a create the client saw succeed exists, a delete it saw succeed is gone, and every endpoint
  still carries traffic (the policy allows the client pods to reach the server pod).
"""

from __future__ import annotations

import ipaddress
import random
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from flagella.datapath.port import pod_netns_name
from tests.support import host
from tests.system._support import (
    ALLOW_TIMEOUT,
    DENY_TIMEOUT,
    Agent,
    Cluster,
    Pod,
    addr4,
    addr6,
    assert_allowed,
    bpftool_dump,
    cnp_ingress,
    links,
    namespace,
    netns_names,
    tcp_connect,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(150)]

SEED = 1101
ROUNDS = 8
PORT = 7500


def _kill_during(agent: Agent, method: str, params: dict[str, Any], delay: float) -> tuple[str, Any]:
    """Send one request, SIGKILL the agent ``delay`` s later; ("ok", result) or ("killed", error)."""
    out: dict[str, Any] = {}

    def request() -> None:
        try:
            out["ok"] = agent.call(method, params, timeout=10)
        except Exception as exc:
            out["killed"] = f"{exc.__class__.__name__}: {exc}"

    t = threading.Thread(target=request, daemon=True)
    t.start()
    time.sleep(delay)
    agent.kill9()
    t.join(timeout=15)
    assert not t.is_alive(), f"{method}: the client hung after the agent died"
    return ("ok", out["ok"]) if "ok" in out else ("killed", out.get("killed"))


def _inconsistencies(agent: Agent, ns: str) -> tuple[list[str], list[str]]:
    """(problems, identity reference problems) of the node after a restart."""
    problems = []
    eps = agent.call("endpoint.list")
    by_netns = {e["netns"]: e for e in eps}
    for e in eps:
        if e["state"] != "ready":
            problems.append(f"endpoint {e['id']} {e['namespace']}/{e['name']} is {e['state']}")
    # Pods on the host.
    ours = {n for n in netns_names() if n.startswith(f"{ns}_") and n != agent.node}
    for name in sorted(ours - set(by_netns)):
        problems.append(f"netns {name} has no endpoint")
    for name in sorted(set(by_netns) - ours):
        problems.append(f"endpoint {by_netns[name]['id']} has no netns {name}")
    veths = {}
    for link in links(agent.node):
        alias = link.get("ifalias") or ""
        if link["ifname"].startswith("fl") and alias.startswith(f"{ns}_"):
            veths[alias] = link
            if alias not in by_netns:
                problems.append(f"veth {link['ifname']} (ifalias {alias}) has no endpoint")
            elif link["ifindex"] != by_netns[alias]["ifindex"]:
                problems.append(f"veth {link['ifname']} is ifindex {link['ifindex']}, endpoint says {by_netns[alias]['ifindex']}")
    for name, e in by_netns.items():
        if name not in veths:
            problems.append(f"endpoint {e['id']} ({name}) has no host veth")
    # Kernel maps.
    ids = {e["id"] for e in eps}
    stray_policy = sorted({x["formatted"]["key"]["ep_id"] for x in bpftool_dump(agent, "policy")} - ids)
    if stray_policy:
        problems.append(f"policy map entries of unknown endpoint ids {stray_policy}")
    rows = {x["formatted"]["key"]: x["formatted"]["value"] for x in bpftool_dump(agent, "endpoints")}
    for ifindex in sorted(set(rows) - {e["ifindex"] for e in eps}):
        problems.append(f"endpoints map row for unknown ifindex {ifindex} (ep_id {rows[ifindex]['ep_id']})")
    for e in eps:
        row = rows.get(e["ifindex"])
        if row is None or row["ep_id"] != e["id"] or row["identity"] != e["identity"]:
            problems.append(f"endpoints map row of ifindex {e['ifindex']} is {row}, endpoint {e['id']} identity {e['identity']}")
    test_net = (ipaddress.ip_network("10.244.200.0/24"), ipaddress.ip_network("fd00:10:244::c800/120"))
    ipcache = {
        r["prefix"]: r["identity"] for r in agent.call("bpf.ipcache")
        if any(ipaddress.ip_network(r["prefix"]).subnet_of(n) for n in test_net
               if ipaddress.ip_network(r["prefix"]).version == n.version)
    }
    want = {f"{e['ipv4']}/32": e["identity"] for e in eps} | {f"{e['ipv6']}/128": e["identity"] for e in eps}
    if ipcache != want:
        problems.append(f"ipcache {sorted(ipcache.items())} != endpoints' addresses {sorted(want.items())}")
    return problems, _identity_problems(agent, ns)


def _identity_problems(agent: Agent, ns: str) -> list[str]:
    """Identities of the namespace whose reference count differs from the endpoints holding them."""
    eps = agent.call("endpoint.list")
    held = Counter(e["identity"] for e in eps if e["namespace"] == ns)
    refs = {i["id"]: i["references"] for i in agent.call("identity.list")
            if any(f"io.kubernetes.pod.namespace={ns}" in lab for lab in i["labels"])}
    return [
        f"identity {ident}: {refs.get(ident, 0)} references, {held.get(ident, 0)} endpoints hold it"
        for ident in sorted(set(refs) | set(held)) if refs.get(ident, 0) != held.get(ident, 0)
    ]


def test_kill9_during_create_and_delete_leaves_a_consistent_node(
    make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]
) -> None:
    agent = make_agent("cr")
    c = make_cluster(agent)
    ns = namespace("cr")
    server = c.create("server", ns, 120, {"app": "server"})
    c.servers.tcp_echo(server.netns, server.ipv4, PORT)
    c.import_policy(cnp_ingress("sys-crash", ns, {"app": "server"}, {"app": "client"}, [(PORT, "TCP")]))

    rng = random.Random(SEED)
    # Create takes ~20 ms and delete ~40 ms on an idle machine: most kills land inside them,
    # a few later (up to 150 ms).
    create_delays = [rng.uniform(0, 0.03) for _ in range(5)] + [rng.uniform(0.03, 0.15) for _ in range(3)]
    delete_delays = [rng.uniform(0, 0.05) for _ in range(5)] + [rng.uniform(0.05, 0.15) for _ in range(3)]
    rng.shuffle(create_delays)
    rng.shuffle(delete_delays)
    created_ok: set[str] = set()
    deleted_ok: set[str] = set()
    log: list[str] = []
    identity_log: list[str] = []

    def restart_and_check(after: str) -> None:
        agent.start()
        eps = agent.call("endpoint.list")
        # Whatever exists now is deleted through the agent at teardown.
        c.pods = {f"{ns}/{e['name']}": Pod(e["name"], ns, int(e["ipv4"].rsplit(".", 1)[1]), e) for e in eps}
        problems, id_problems = _inconsistencies(agent, ns)
        if id_problems and not identity_log:
            identity_log.extend([f"after {after}:", *id_problems])
        names = {e["name"] for e in eps}
        problems += [f"create of {n} was answered but it is gone" for n in sorted(created_ok - names)]
        problems += [f"delete of {n} was answered but it is back" for n in sorted(deleted_ok & names)]
        assert not problems, f"after {after}:\n  " + "\n  ".join(problems) + "\n" + "\n".join(log)
        for pod in c.pods.values():
            if pod.ep["labels"].get("app") == "client":
                assert_allowed(pod, server.ipv4, PORT, f"{pod.name} after {after}")

    for i in range(ROUNDS):
        victim = c.create(f"d{i}", ns, 130 + i, {"app": "client"})
        created_ok.add(victim.name)

        name, n = f"c{i}", 140 + i
        c.netns_seen.add(pod_netns_name(ns, name))
        params = {"name": name, "namespace": ns, "labels": ["app=client"], "ipv4": addr4(n), "ipv6": addr6(n)}
        outcome, detail = _kill_during(agent, "endpoint.create", params, create_delays[i])
        if outcome == "ok":
            created_ok.add(name)
        log.append(f"round {i}: create {name}, kill after {create_delays[i] * 1000:.0f} ms: {outcome}")
        restart_and_check(f"kill -9 during create of {name}")

        outcome, detail = _kill_during(agent, "endpoint.delete", {"name": victim.key}, delete_delays[i])
        created_ok.discard(victim.name)  # a killed delete may have happened or not
        if outcome == "ok":
            deleted_ok.add(victim.name)
        log.append(f"round {i}: delete {victim.name}, kill after {delete_delays[i] * 1000:.0f} ms: {outcome}")
        restart_and_check(f"kill -9 during delete of {victim.name}")

    restores = [(r["restored"], r["removed"]) for r in agent.log_events("agent-restored")]
    killed = sum(1 for line in log if line.endswith("killed"))
    print("\n" + "\n".join(log) + f"\nrestores (restored, removed): {restores}")
    assert killed >= 1, "no kill landed before an operation answered: the test exercised nothing"
    assert not identity_log, "identity references corrupted by a kill -9: " + " ".join(identity_log)


def test_kill9_between_identity_release_and_record_delete(
    make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]
) -> None:
    """Deterministic version of one crash point: strace holds the agent at the unlink of the
    endpoint record (after the identity release is committed) and the agent is killed there."""
    host.require("strace")
    agent = make_agent("ci")
    c = make_cluster(agent)
    ns = namespace("ci")
    server = c.create("server", ns, 150, {"app": "server"})
    a = c.create("a", ns, 151, {"app": "client"})
    b = c.create("b", ns, 152, {"app": "client"})
    assert a.ep["identity"] == b.ep["identity"]
    shared = b.ep["identity"]
    c.servers.tcp_echo(server.netns, server.ipv4, PORT)
    c.import_policy(cnp_ingress("sys-crash-id", ns, {"app": "server"}, {"app": "client"}, [(PORT, "TCP")]))
    assert_allowed(b, server.ipv4, PORT)

    record = agent.state_dir / "endpoints" / f"{a.ep['id']}.json"
    assert record.exists()
    assert agent.proc is not None
    tracer = subprocess.Popen(
        ["strace", "-f", "-p", str(agent.proc.pid), "-o", "/dev/null", "-P", str(record),
         "-e", "trace=unlink,unlinkat", "-e", "inject=unlink,unlinkat:delay_enter=10s"],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(tracer.stderr or []), daemon=True)
    reader.start()
    db = sqlite3.connect(f"file:{agent.state_dir / 'identities.db'}?mode=ro", uri=True)
    try:
        wait_until(lambda: any("attached" in line for line in lines), timeout=10, what="strace to attach")

        def refs() -> int:
            row = db.execute("SELECT refs FROM identities WHERE id = ?", (shared,)).fetchone()
            return int(row[0]) if row else 0

        assert refs() == 2
        answer: dict[str, Any] = {}

        def delete() -> None:
            try:
                answer["ok"] = agent.call("endpoint.delete", {"name": a.key}, timeout=30)
            except Exception as exc:
                answer["error"] = str(exc)

        t = threading.Thread(target=delete, daemon=True)
        t.start()
        # The release is committed and the record still exists: strace holds its unlink.
        wait_until(lambda: refs() == 1, timeout=15, interval=0.01, what="the identity release")
        assert record.exists(), "the record was deleted before the kill: strace did not hold the unlink"
        # SIGKILL aborts the held unlink. The traced agent's exit goes to strace first: only
        # then can our wait() see it.
        agent.proc.kill()
        time.sleep(0.2)
        tracer.kill()
        tracer.wait(timeout=10)
        agent.proc.wait(timeout=10)
        assert record.exists(), "the held unlink ran after all"
        t.join(timeout=15)
        assert "error" in answer, f"the delete answered before the kill: {answer}"
    finally:
        db.close()
        if tracer.poll() is None:
            tracer.kill()
        tracer.wait(timeout=10)
    c.pods.pop(a.key, None)
    agent.start()
    names = {e["name"] for e in agent.call("endpoint.list")}
    assert names == {"server", "b"}, names
    problems = _identity_problems(agent, ns)
    # With the bug the identity b still holds is free, and the next new label set gets its number:
    # the two pods then share one identity whose labels are the newcomer's.
    rogue = c.create("rogue", ns, 153, {"app": "rogue"})
    b_now = tcp_connect(b.netns, server.ipv4, PORT, ALLOW_TIMEOUT)
    rogue_now = tcp_connect(rogue.netns, server.ipv4, PORT, DENY_TIMEOUT)
    effect = (
        f"b (app=client, identity {shared}) -> server: {b_now}; "
        f"rogue (app=rogue, identity {rogue.ep['identity']}) -> server: {rogue_now}"
    )
    assert not problems, f"after the kill -9 and restart: {problems}; then {effect}"
    assert rogue.ep["identity"] != shared, f"app=rogue got identity {shared}, which b (app=client) holds; {effect}"
    assert (b_now, rogue_now) == ("open", "timeout"), effect
