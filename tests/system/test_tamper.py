"""Drift repair: entries changed behind the agent's back with bpftool come back within the
sync interval, traffic follows, and every repair is counted (``status`` and Prometheus).

Each tamper is timed right after a ``sync-maps`` run, so the traffic probes that follow it see
the damaged map (proving the traffic depended on the entry) before the next run repairs it.
A tamper whose probes raced the repair is repeated (at most three times).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.system._support import (
    Agent,
    Cluster,
    Pod,
    assert_allowed,
    assert_denied,
    bpftool_dump,
    cnp_ingress,
    hex_bytes,
    namespace,
    sh,
    tamper_until_observed,
    tcp_connect,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

SYNC_S = 1.0
GAP_PROBE_TIMEOUT = 0.3  # well inside one sync interval
PORT = 7400


def _probe_both(client: Pod, intruder: Pod, dst: str) -> tuple[str, str]:
    """Client and intruder connect at the same time (one GAP_PROBE_TIMEOUT for both)."""
    out: dict[str, str] = {}
    t = threading.Thread(target=lambda: out.__setitem__("i", tcp_connect(intruder.netns, dst, PORT, GAP_PROBE_TIMEOUT)))
    t.start()
    out["c"] = tcp_connect(client.netns, dst, PORT, GAP_PROBE_TIMEOUT)
    t.join()
    return out["c"], out["i"]


def test_sync_controller_repairs_tampered_maps(make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]) -> None:
    agent = make_agent("tm", sync_interval_s=SYNC_S)
    c = make_cluster(agent)
    ns = namespace("tm")
    server = c.create("server", ns, 70, {"app": "server"})
    client = c.create("client", ns, 71, {"app": "client"})
    intruder = c.create("intruder", ns, 72, {"app": "intruder"})
    c.servers.tcp_echo(server.netns, server.ipv4, PORT)
    c.import_policy(cnp_ingress("sys-tamper", ns, {"app": "server"}, {"app": "client"}, [(PORT, "TCP")]))
    assert_allowed(client, server.ipv4, PORT)
    assert_denied(intruder, server.ipv4, PORT)
    before = agent.call("status")["repairs"]
    pin = str(agent.bpf_dir / "policy")

    def policy_keys() -> dict[tuple[int, ...], dict[str, Any]]:
        out = {}
        for e in bpftool_dump(agent, "policy"):
            k = e["formatted"]["key"]
            out[(k["ep_id"], k["identity"], k["egress"], k["protocol"], k["wild_bits"], k["port"])] = e
        return out

    allow_key = (server.ep["id"], client.ep["identity"], 0, 6, 0, PORT)
    stray_key = (server.ep["id"], intruder.ep["identity"], 0, 6, 0, PORT)
    entries = policy_keys()
    assert allow_key in entries, f"no policy entry {allow_key} in {sorted(entries)}"
    assert stray_key not in entries
    allow = entries[allow_key]
    key_hex = hex_bytes(allow["key"])
    stray_hex = list(key_hex)
    stray_hex[4:8] = [f"{b:02x}" for b in struct.pack("<I", intruder.ep["identity"])]
    # The allow entry's configuration half (verdict, proxy port, precedence) with zero counters.
    value_hex = hex_bytes(allow["value"])[:8] + ["00"] * (len(allow["value"]) - 8)

    # 1. Policy map: the client's allow entry deleted, a stray allow for the intruder added.
    def tamper_policy() -> None:
        sh("bpftool", "map", "delete", "pinned", pin, "key", "hex", *key_hex)
        sh("bpftool", "map", "update", "pinned", pin, "key", "hex", *stray_hex, "value", "hex", *value_hex)

    def policy_repaired() -> bool:
        keys = policy_keys()
        return allow_key in keys and stray_key not in keys

    def policy_gap_seen() -> bool:
        return _probe_both(client, intruder, server.ipv4) == ("timeout", "open")

    tampers, took = tamper_until_observed(agent, SYNC_S, tamper_policy, policy_repaired, policy_gap_seen, "the policy map")
    timings = [f"policy map: {tampers} tamper(s), repaired in {took:.2f}s"]
    assert took <= SYNC_S + 1.0, f"policy map repaired after {took:.2f}s with a {SYNC_S}s sync interval"
    assert_allowed(client, server.ipv4, PORT, "after the policy repair")
    assert_denied(intruder, server.ipv4, PORT, "after the policy repair (stray entry)")
    expected = {"policy": before.get("policy", 0) + 2 * tampers}

    # 2. Endpoints map: the server's row deleted, so the datapath no longer knows the device
    #    and lets everything through.
    ep_pin = str(agent.bpf_dir / "endpoints")
    ifindex_hex = [f"{b:02x}" for b in struct.pack("<I", server.ep["ifindex"])]

    def tamper_endpoint() -> None:
        sh("bpftool", "map", "delete", "pinned", ep_pin, "key", "hex", *ifindex_hex)

    def endpoint_repaired() -> bool:
        return any(e["formatted"]["key"] == server.ep["ifindex"] for e in bpftool_dump(agent, "endpoints"))

    def endpoint_gap_seen() -> bool:
        return tcp_connect(intruder.netns, server.ipv4, PORT, GAP_PROBE_TIMEOUT) == "open"

    n, took = tamper_until_observed(agent, SYNC_S, tamper_endpoint, endpoint_repaired, endpoint_gap_seen, "the endpoints map")
    timings.append(f"endpoints map: {n} tamper(s), repaired in {took:.2f}s")
    assert took <= SYNC_S + 1.0, f"endpoints map repaired after {took:.2f}s"
    assert_denied(intruder, server.ipv4, PORT, "after the endpoints repair")
    assert_allowed(client, server.ipv4, PORT, "after the endpoints repair")
    expected["endpoints"] = before.get("endpoints", 0) + n

    # 3. ipcache: the client's address deleted, so the client is "world" to the server.
    ipc_pin = str(agent.bpf_dir / "ipcache4")
    entry = next(
        e for e in bpftool_dump(agent, "ipcache4")
        if e["formatted"]["key"]["prefixlen"] == 32
        and bytes(int(b, 16) for b in e["key"][4:8]) == bytes(int(x) for x in client.ipv4.split("."))
    )
    ipc_key = hex_bytes(entry["key"])

    def tamper_ipcache() -> None:
        sh("bpftool", "map", "delete", "pinned", ipc_pin, "key", "hex", *ipc_key)

    def ipcache_repaired() -> bool:
        return any(hex_bytes(e["key"]) == ipc_key for e in bpftool_dump(agent, "ipcache4"))

    def ipcache_gap_seen() -> bool:
        return tcp_connect(client.netns, server.ipv4, PORT, GAP_PROBE_TIMEOUT) == "timeout"

    n, took = tamper_until_observed(agent, SYNC_S, tamper_ipcache, ipcache_repaired, ipcache_gap_seen, "the ipcache")
    timings.append(f"ipcache: {n} tamper(s), repaired in {took:.2f}s")
    assert took <= SYNC_S + 1.0, f"ipcache repaired after {took:.2f}s"
    assert_allowed(client, server.ipv4, PORT, "after the ipcache repair")
    expected["ipcache"] = before.get("ipcache", 0) + n

    # Every repair counted, nothing else: `flagella status -o json` and Prometheus agree.
    status = agent.cli_json("status")
    assert status["repairs"] == expected, f"repairs {status['repairs']}, expected {expected}"
    text = agent.cli("status").stdout
    assert f"Map repairs: {sum(expected.values())}" in text, text
    for name, count in expected.items():
        got = agent.metric("flagella_map_repairs_total", map=name)
        assert got == count, f"flagella_map_repairs_total{{map={name!r}}} = {got}, expected {count}"
    print("\n" + "; ".join(timings) + f"; repairs {status['repairs']}")
