"""Datapath benchmark: what enforcing policy costs a packet, and how fast policy lands.

    .venv/bin/python bench/datapath.py [--quick] [--no-write] [--load maps|agent]

Theory of operation
-------------------
Two pods (client, server) made by the real agent (``flagella agent`` as a subprocess,
driven over its socket) carry TCP request/response (``sockperf ping-pong``, 64 bytes,
one request in flight) and bulk (``iperf3``, one stream) traffic, in turn under:

* ``none``: no program attached, no rule: plain veth routing;
* ``flagella``: the agent's programs on both pods' host veths, attached as the agent does
  on this kernel (pinned tcx links where it has tcx), policy enforced in both directions
  of both pods, with 10,000 policy entries and 10,000 ipcache entries (the client's and
  server's allow entries among them; the rest are CIDR identities the server admits on
  another port);
* ``flagella-tc``: the same programs and maps, attached as clsact filters (the fallback
  for kernels without tcx, ``attach_mode: tc``);
* ``iptables``: no program; a FORWARD chain of 10,000 ACCEPT rules expressing the same
  allow-list, the matching rules last (each direction), then DROP. Every packet walks it;
* ``iptables-ct``: the same chain behind a conntrack ESTABLISHED accept, as iptables-based
  policy engines install it: only a connection's first packet walks the list.

The pods' own policies are imported through the agent. The other entries are written
into the pinned maps directly (``--load maps``, the default; the agent's sync controller
is slowed down so it does not delete them) because importing 10,000 CIDRs as a policy
(``--load agent``) takes the agent minutes.

Load generators and servers are pinned to one CPU, the configurations rotate within each
repetition (so drift and background load hit all of them alike), and the medians of the
repetitions are reported. Then, with the same agent: the wall time of ``endpoint.create``
(which returns once the kernel enforces the endpoint's policy; a denied connection is
tried right after and must be dropped), and of a policy import that changes the maps of
100 endpoints (confirmed by reading the pinned policy map).

Everything runs inside a private node namespace (see ``_netbench``): nothing is added
to the root namespace, and everything is removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import platform
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _netbench import (  # noqa: E402
    LISTENER,
    BenchError,
    NodeNamespace,
    iperf3_gbps,
    iptables_allowlist,
    median,
    percentile,
    remove_bpf_dir,
    replace_section,
    sh,
    sockperf_pingpong,
    spread,
    sweep_stale,
    tcp_connect,
    wait_for_port,
)
from flagella.cli._client import call  # noqa: E402
from flagella.datapath import maps as m  # noqa: E402
from flagella.datapath.loader import PROGRAMS, DatapathSettings, load_datapath  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FLAGELLA = REPO / ".venv" / "bin" / "flagella"
NETGUARD = Path(__file__).resolve().parents[2] / "shared" / "tools" / "netguard"  # ../shared beside the repo

POD_CIDR = ipaddress.IPv4Network("10.244.210.0/24")
CLIENT_IP = "10.244.210.10"
SERVER_IP = "10.244.210.11"
OTHERS_NET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking range: never routed
NAMESPACE = "bench"  # the pods' Kubernetes namespace: their netns are bench_<name>

SOCKPERF_PORT = 11111
IPERF_PORT = 5201
PROBE_OPEN_PORT = 7000  # probe endpoints may reach the server here ...
PROBE_DENIED_PORT = 7001  # ... and not here (a listener answers on both)
OTHERS_PORT = 8443
ENTRIES = 10_000
# Load generators and servers share one CPU: across vCPUs every request pays a wake-up
# IPI whose cost varies by tens of µs from run to run (measured: ±50% vs ±5% pinned).
BENCH_CPU = (os.cpu_count() or 1) - 1
OTHER_IDENTITY_BASE = 1 << 24
TCP = 6

CONFIGS = ("none", "flagella", "flagella-tc", "iptables", "iptables-ct")
_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    reps: int
    sockperf_s: float
    iperf_s: float
    probes: int
    fleet: int
    policy_changes: int
    small_reps: int  # (a)/(b) again with only the pods' own entries
    cidr_import: int  # CIDRs in the policy whose import through the agent is timed

    @classmethod
    def for_args(cls, quick: bool) -> Plan:
        if quick:
            return cls(reps=1, sockperf_s=2, iperf_s=1, probes=5, fleet=10, policy_changes=2, small_reps=1,
                       cidr_import=250)
        return cls(reps=5, sockperf_s=4, iperf_s=3, probes=20, fleet=100, policy_changes=5, small_reps=3,
                   cidr_import=1000)


# -- policies ------------------------------------------------------------------------------------


def _app(name: str) -> dict[str, Any]:
    return {"matchLabels": {"app": name}}


def _ports(*ports: int) -> list[dict[str, Any]]:
    return [{"ports": [{"port": str(p), "protocol": "TCP"} for p in ports]}]


def _cnp(name: str, app: str, ingress: list[Any] | None = None, egress: list[Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"endpointSelector": _app(app)}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def pod_policies() -> list[dict[str, Any]]:
    """Client and server enforce both directions; probes may only reach the server's open port."""
    return [
        _cnp("bench-client", "bench-cli",
             ingress=[{"fromEndpoints": [_app("bench-srv")]}],
             egress=[{"toEndpoints": [_app("bench-srv")], "toPorts": _ports(SOCKPERF_PORT, IPERF_PORT)}]),
        _cnp("bench-server", "bench-srv",
             ingress=[{"fromEndpoints": [_app("bench-cli")], "toPorts": _ports(SOCKPERF_PORT, IPERF_PORT)},
                      {"fromEndpoints": [_app("bench-probe")], "toPorts": _ports(PROBE_OPEN_PORT)}],
             egress=[{"toEndpoints": [_app("bench-cli")]}]),
        _cnp("bench-probe", "bench-probe",
             egress=[{"toEndpoints": [_app("bench-srv")], "toPorts": _ports(PROBE_OPEN_PORT)}]),
    ]


def other_addresses(n: int) -> list[str]:
    hosts = OTHERS_NET.hosts()
    return [str(next(hosts)) for _ in range(n)]


def others_policy(addresses: list[str]) -> dict[str, Any]:
    """The server admits each of ``addresses`` (one CIDR identity each) on another port."""
    return _cnp("bench-others", "bench-srv",
                ingress=[{"fromCIDRSet": [{"cidr": f"{a}/32"} for a in addresses], "toPorts": _ports(OTHERS_PORT)}])


def fleet_policy(port: int) -> dict[str, Any]:
    return _cnp("bench-fleet", "bench-fleet", ingress=[{"fromEndpoints": [_app("bench-cli")], "toPorts": _ports(port)}])


# -- the agent -----------------------------------------------------------------------------------


class Agent:
    """``flagella agent`` in the node namespace, with its own state dir, socket and bpf dir."""

    def __init__(self, node: NodeNamespace, workdir: Path, sync_interval_s: float | None) -> None:
        self.node = node
        self.sync_interval_s = sync_interval_s
        self.workdir = workdir
        self.socket = str(workdir / "agent.sock")
        self.bpf_dir = Path(f"/sys/fs/bpf/flagella-bench-{node.pid}")
        self.log = workdir / "agent.log"
        self.config = workdir / "agent.json"
        self.pid = 0

    def start(self, timeout: float = 120) -> float:
        settings: dict[str, Any] = {
            "state_dir": str(self.workdir / "state"), "socket": self.socket, "bpf_dir": str(self.bpf_dir),
            "metrics_addr": "", "network": {"ipv4_cidr": str(POD_CIDR), "ipv6_cidr": ""},
            # The kernel datapath alone: no L7 rules here, and the node proxy's plumbing (policy
            # routing rules) is priced by bench/redirect.py.
            "proxy": {"enabled": False},
        }
        if self.sync_interval_s is not None:
            settings["controllers"] = {"sync_interval_s": self.sync_interval_s}
        self.config.write_text(json.dumps(settings))
        t0 = time.perf_counter()
        proc = self.node.spawn(str(FLAGELLA), "agent", "--config", str(self.config), log=self.log)
        self.pid = proc.pid
        while True:
            if proc.poll() is not None:
                raise BenchError(f"flagella agent exited with {proc.returncode}:\n{self.log_tail()}")
            try:
                self.call("status")
                return time.perf_counter() - t0
            except Exception:
                if time.perf_counter() - t0 > timeout:
                    raise BenchError(f"flagella agent not answering after {timeout}s:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return call(self.socket, method, params or {}, timeout=300)

    def create(self, name: str, app: str, ipv4: str | None = None) -> dict[str, Any]:
        params = {"name": name, "namespace": NAMESPACE, "labels": [f"app={app}"], "ipv4": ipv4}
        endpoint: dict[str, Any] = self.call("endpoint.create", params)
        return endpoint

    def import_policies(self, docs: list[dict[str, Any]]) -> int:
        """Import and wait until every endpoint realized the revision (policy import --wait)."""
        revision = int(self.call("policy.import", {"documents": docs})["revision"])
        lagging = self.call("policy.wait", {"revision": revision, "timeout": 280})["lagging"]
        if lagging:
            raise RuntimeError(f"revision {revision} not realized by {[ep['id'] for ep in lagging]}")
        return revision

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


# -- the benchmark ------------------------------------------------------------------------------


class DatapathBench:
    def __init__(self, node: NodeNamespace, workdir: Path, plan: Plan, load: str) -> None:
        self.node = node
        self.plan = plan
        self.load = load
        # Entries written behind the agent's back would be removed by its sync controller.
        self.agent = Agent(node, workdir, sync_interval_s=86400 if load == "maps" else None)
        self.pid = node.pid
        self.client: dict[str, Any] = {}
        self.server: dict[str, Any] = {}
        self.dp: Any = None
        self.dp_tc: Any = None  # the same build, attaching clsact filters
        self.iptables = _iptables_flavour()
        self.chain = f"BENCH-{self.pid}"
        self.rulesets: dict[str, str] = {}
        self.setup: dict[str, Any] = {}

    # -- setup --------------------------------------------------------------------------------

    def start(self) -> None:
        self.setup["agent_start_s"] = round(self.agent.start(), 2)
        self.agent.import_policies(pod_policies())
        self.client = self.agent.create(f"cli-{self.pid}", "bench-cli", CLIENT_IP)
        self.server = self.agent.create(f"srv-{self.pid}", "bench-srv", SERVER_IP)
        srv = self.server["netns"]
        pin = ("taskset", "-c", str(BENCH_CPU))
        self.node.spawn(*pin, "sockperf", "server", "--tcp", "-i", SERVER_IP, "-p", str(SOCKPERF_PORT), netns=srv)
        self.node.spawn(*pin, "iperf3", "-s", "-B", SERVER_IP, "-p", str(IPERF_PORT), netns=srv)
        self.node.spawn(sys.executable, "-c", LISTENER, SERVER_IP, str(PROBE_OPEN_PORT), str(PROBE_DENIED_PORT),
                        netns=srv)

        self.dp = load_datapath(DatapathSettings(pin_dir=self.agent.bpf_dir))
        self.dp_tc = load_datapath(DatapathSettings(pin_dir=self.agent.bpf_dir, attach="tc"))
        self.setup["attach_mode"] = self.dp.attach_mode
        attached = self.dp.attached(self.server["ifindex"])
        if self.dp.compiled or attached.get("from_pod") != self.dp.build:
            raise BenchError(f"the agent runs build {attached}, not {self.dp.build}: did bpf/ change meanwhile?")

        # Fill the maps to ENTRIES entries with the server's allow-list of other identities.
        others = other_addresses(ENTRIES - len(self.dp.maps.policy))
        self.setup["other_identities"] = len(others)
        self.setup["load"] = self.load
        t0 = time.perf_counter()
        if self.load == "agent":
            self.agent.import_policies([others_policy(others)])
        else:
            # A few more ipcache-only identities (peers nothing allows) round the ipcache up too.
            known = len(self.dp.maps.ipcache.items())
            self.load_others(other_addresses(max(len(others), ENTRIES - known)), allowed=len(others))
        self.setup["load_others_s"] = round(time.perf_counter() - t0, 2)
        self.setup["policy_entries"] = len(self.dp.maps.policy)
        self.setup["ipcache_entries"] = len(self.dp.maps.ipcache.items())
        self.setup["server_policy_entries"] = len(self.dp.maps.policy.entries(self.server["id"]))
        self.setup["client_policy_entries"] = len(self.dp.maps.policy.entries(self.client["id"]))
        eps = {e["name"]: e for e in self.agent.call("endpoint.list")}
        self.setup["enforcement"] = {n: eps[e["name"]]["policy_enforcement"] for n, e in
                                     (("client", self.client), ("server", self.server))}

        allowed = [(CLIENT_IP, SERVER_IP, SOCKPERF_PORT), (CLIENT_IP, SERVER_IP, IPERF_PORT)]
        replies = [(SERVER_IP, CLIENT_IP, SOCKPERF_PORT), (SERVER_IP, CLIENT_IP, IPERF_PORT)]
        rest = [(a, SERVER_IP, OTHERS_PORT) for a in other_addresses(ENTRIES - len(allowed) - len(replies))]
        self.setup["iptables_other_rules"] = len(rest)
        for name, stateful in (("iptables", False), ("iptables-ct", True)):
            self.rulesets[name] = iptables_allowlist(self.chain, rest, allowed, replies, str(POD_CIDR), stateful)
        self.setup["iptables_rules"] = ENTRIES + 1
        self.setup["iptables"] = self.iptables[1]
        wait_for_port(self.client["netns"], SERVER_IP, SOCKPERF_PORT)
        wait_for_port(self.client["netns"], SERVER_IP, IPERF_PORT)

    def load_others(self, addresses: list[str], allowed: int) -> None:
        """What importing `others_policy` writes, written directly: one CIDR identity per
        address (from 2^24 up, Cilium's local scope, which the agent's allocator never
        hands out) with its ipcache entry, and for the first ``allowed`` of them an allow
        entry on the server."""
        idents = [OTHER_IDENTITY_BASE + i for i in range(len(addresses))]
        self.dp.maps.ipcache.set_many({f"{a}/32": ident for a, ident in zip(addresses, idents, strict=True)})
        self.dp.maps.policy.set_many({
            m.PolicyKey(self.server["id"], ident, False, TCP, OTHERS_PORT, 0): (m.Verdict.ALLOW, 0)
            for ident in idents[:allowed]
        })

    # -- configurations -----------------------------------------------------------------------

    def _pods(self) -> list[int]:
        return [self.client["ifindex"], self.server["ifindex"]]

    def neutral(self) -> None:
        """No program attached, no rule: plain veth routing."""
        for ifindex in self._pods():
            self.dp.detach(ifindex)
        restore = self.iptables[0]
        if sh(restore.replace("-restore", ""), "-S", self.chain, check=False).returncode == 0:
            ipt = restore.replace("-restore", "")
            sh(ipt, "-D", "FORWARD", "-s", str(POD_CIDR), "-d", str(POD_CIDR), "-j", self.chain, check=False)
            sh(ipt, "-F", self.chain)
            sh(ipt, "-X", self.chain)
        if "nft" in restore:  # an empty iptables-nft table still hooks every forwarded packet
            sh("nft", "delete", "table", "ip", "filter", check=False)

    def configure(self, config: str) -> None:
        self.neutral()
        if config in ("flagella", "flagella-tc"):
            dp = self.dp if config == "flagella" else self.dp_tc
            for ifindex in self._pods():
                dp.attach(ifindex)
        elif config in self.rulesets:
            sh(self.iptables[0], "--noflush", stdin=self.rulesets[config], timeout=120)
        self.check(config)

    def check(self, config: str) -> None:
        """The allowed flow works; under a policy the client's other connections are dropped."""
        cli = self.client["netns"]
        if tcp_connect(cli, SERVER_IP, SOCKPERF_PORT, 2.0) != "open":
            raise BenchError(f"{config}: the client cannot reach the server")
        denied = tcp_connect(cli, SERVER_IP, PROBE_DENIED_PORT, 0.3)
        if denied != ("open" if config == "none" else "timeout"):
            raise BenchError(f"{config}: client -> server:{PROBE_DENIED_PORT} was {denied}")

    def run_matrix(self) -> dict[str, list[dict[str, float]]]:
        runs: dict[str, list[dict[str, float]]] = {c: [] for c in CONFIGS}
        self.configure("none")
        sockperf_pingpong(self.client["netns"], SERVER_IP, SOCKPERF_PORT, 1, cpu=BENCH_CPU)  # warm-up
        cpu0, t0 = self.agent.cpu_seconds(), time.perf_counter()
        for rep in range(self.plan.reps):
            order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]
            for config in order:
                self.configure(config)
                row = sockperf_pingpong(self.client["netns"], SERVER_IP, SOCKPERF_PORT, self.plan.sockperf_s,
                                        cpu=BENCH_CPU)
                row["gbps"] = iperf3_gbps(self.client["netns"], SERVER_IP, IPERF_PORT, self.plan.iperf_s,
                                          cpu=BENCH_CPU)
                runs[config].append(row)
                say(f"rep {rep + 1} {config:12s} {row['tps']:9.0f} tx/s  rtt p50 {row['rtt_p50_us']:6.1f} us"
                    f"  p99 {row['rtt_p99_us']:6.1f} us  {row['gbps']:6.2f} Gbit/s")
        self.setup["agent_cpu_during_matrix_pct"] = round(
            100 * (self.agent.cpu_seconds() - cpu0) / (time.perf_counter() - t0), 1)
        self.setup["policy_entries_after"] = len(self.dp.maps.policy)
        self.neutral()
        return runs

    def program_cost(self) -> dict[str, Any]:
        """ns per run of each program, from the kernel's BPF run-time statistics
        (`kernel.bpf_stats_enabled`, `bpftool prog show`: run_time_ns / run_cnt), under
        (b)'s ping-pong. A phase of its own: the statistics cost every program two clock
        reads per run, which would shift the matrix's ratios."""
        stats = Path("/proc/sys/kernel/bpf_stats_enabled")
        before_flag = stats.read_text().strip()

        def snapshot() -> dict[str, tuple[int, int]]:
            out = {}
            for name in PROGRAMS:
                info = json.loads(sh("bpftool", "-j", "prog", "show", "pinned",
                                     str(self.dp.prog_dir / name)).stdout)
                out[name] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
            return out

        self.configure("flagella")
        stats.write_text("1\n")
        try:
            s0 = snapshot()
            row = sockperf_pingpong(self.client["netns"], SERVER_IP, SOCKPERF_PORT, self.plan.sockperf_s,
                                    cpu=BENCH_CPU)
            s1 = snapshot()
        finally:
            stats.write_text(before_flag + "\n")
        self.neutral()
        progs = {}
        for name in PROGRAMS:
            ns, cnt = s1[name][0] - s0[name][0], s1[name][1] - s0[name][1]
            progs[name] = {"runs": cnt, "ns_per_run": round(ns / cnt, 1) if cnt else None}
        say(f"program cost: {json.dumps(progs)}")
        # Hook runs per transaction: four through the host stack (client egress, server ingress,
        # server egress, client ingress); two with local delivery (from_pod does the other end's
        # ingress and hands the packet into the pod, to_pod never runs).
        runs = progs["from_pod"]["runs"] + progs["to_pod"]["runs"]
        return {"programs": progs, "tps": round(row["tps"]),
                "runs_per_transaction": round(runs / max(row["tps"] * self.plan.sockperf_s, 1), 2)}

    def small_maps(self) -> dict[str, Any] | None:
        """(a) and (b) request rates again once the other entries are gone: does the
        10k-entry load cost anything, or is it the programs themselves?"""
        if self.load != "maps":
            return None  # the agent would regenerate the server once per CIDR identity it releases
        policy, ipcache = self.dp.maps.policy, self.dp.maps.ipcache
        for key in [k for k in policy.items() if k.identity >= OTHER_IDENTITY_BASE]:
            policy.delete(key)
        for net in [n for n, v in ipcache.items().items() if v.identity >= OTHER_IDENTITY_BASE]:
            ipcache.delete(net)
        tps: dict[str, list[float]] = {"none": [], "flagella": []}
        for rep in range(self.plan.small_reps):
            for config in ("none", "flagella") if rep % 2 == 0 else ("flagella", "none"):
                self.configure(config)
                tps[config].append(sockperf_pingpong(self.client["netns"], SERVER_IP, SOCKPERF_PORT,
                                                     self.plan.sockperf_s, cpu=BENCH_CPU)["tps"])
                say(f"small maps, {config:8s} {tps[config][-1]:9.0f} tx/s")
        self.neutral()
        none, flagella = median(tps["none"]), median(tps["flagella"])
        return {"policy_entries": len(policy), "ipcache_entries": len(ipcache.items()), "reps": len(tps["none"]),
                "none_tps": round(none), "flagella_tps": round(flagella), "flagella_vs_none_tps": round(flagella / none, 3)}

    # -- control plane --------------------------------------------------------------------------

    def endpoint_create(self) -> dict[str, Any]:
        """endpoint.create wall time; right after it returns, a denied connection must be dropped."""
        times, gaps, verdicts = [], [], []
        for i in range(self.plan.probes):
            t0 = time.perf_counter()
            ep = self.agent.create(f"probe{i}-{self.pid}", "bench-probe")
            t1 = time.perf_counter()
            started: list[float] = []
            denied = tcp_connect(ep["netns"], SERVER_IP, PROBE_DENIED_PORT, 0.5, started)
            gaps.append((started[0] - t1) * 1000)
            allowed = tcp_connect(ep["netns"], SERVER_IP, PROBE_OPEN_PORT, 2.0)
            times.append(t1 - t0)
            verdicts.append((denied, allowed))
        cli_times = []
        for i in range(3):
            t0 = time.perf_counter()
            sh(str(FLAGELLA), "endpoint", "create", f"cliprobe{i}-{self.pid}", "--namespace", NAMESPACE,
               "--labels", "app=bench-probe", "--socket", self.agent.socket, "-o", "json")
            cli_times.append(time.perf_counter() - t0)
        ms = [t * 1000 for t in times]
        return {
            "endpoints": len(times), "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1),
            "denied_dropped": sum(d == "timeout" for d, _ in verdicts),
            "allowed_open": sum(a == "open" for _, a in verdicts),
            "probe_after_return_max_ms": round(max(gaps), 2),
            "cli_process_ms": [round(t * 1000) for t in cli_times],
        }

    def policy_change(self) -> dict[str, Any]:
        """A policy selecting ``fleet`` endpoints is imported, then its port changed; each
        import's wall time, confirmed by every endpoint's entries in the pinned policy map."""
        fleet, create_ms = [], []
        for i in range(self.plan.fleet):
            t0 = time.perf_counter()
            fleet.append(self.agent.create(f"fleet{i}-{self.pid}", "bench-fleet"))
            create_ms.append((time.perf_counter() - t0) * 1000)
        identity = self.client["identity"]
        times, verified = [], 0
        for change in range(self.plan.policy_changes):
            port, old = 80 + change % 2, 80 + (change + 1) % 2
            t0 = time.perf_counter()
            revision = self.agent.import_policies([fleet_policy(port)])
            times.append(time.perf_counter() - t0)
            waiting = self.agent.call("policy.wait", {"revision": revision})["waiting"]
            pol = self.dp.maps.policy
            ok = not waiting and all(
                pol.get(m.PolicyKey(ep["id"], identity, False, TCP, port, 0)) is not None
                and (change == 0 or pol.get(m.PolicyKey(ep["id"], identity, False, TCP, old, 0)) is None)
                for ep in fleet
            )
            verified += ok
        return {
            "endpoints": len(fleet), "imports": len(times), "verified": verified,
            "import_s": [round(t, 3) for t in times], "median_s": round(median(times), 3),
            "max_s": round(max(times), 3),
            "fleet_create_p50_ms": round(percentile(create_ms, 50), 1),
            "fleet_create_p99_ms": round(percentile(create_ms, 99), 1),
        }

    def cidr_import(self) -> dict[str, Any] | None:
        """Wall time of importing a policy of ``plan.cidr_import`` CIDRs through the agent:
        what ``--load agent`` pays, at a size that fits the run."""
        if self.load != "maps":
            return None  # the run already imported 10k of them
        n = self.plan.cidr_import
        doc = others_policy(other_addresses(n))
        doc["metadata"]["name"] = "bench-cidr-import"
        t0 = time.perf_counter()
        self.agent.import_policies([doc])
        return {"cidrs": n, "import_s": round(time.perf_counter() - t0, 2)}

    def close(self) -> None:
        if self.dp is not None:
            try:
                self.neutral()
            finally:
                self.dp.close()
                if self.dp_tc is not None:
                    self.dp_tc.close()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _iptables_flavour() -> tuple[str, str]:
    for restore in ("iptables-nft-restore", "iptables-legacy-restore"):
        p = sh(restore.replace("-restore", ""), "--version", check=False)
        if p.returncode == 0:
            return restore, p.stdout.strip()
    raise BenchError("neither iptables-nft nor iptables-legacy works here")


# -- report --------------------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for config, rows in runs.items():
        agg: dict[str, Any] = {k: round(median([r[k] for r in rows]), 2) for k in ("rtt_avg_us", "rtt_p50_us", "rtt_p99_us", "tps", "gbps")}
        agg["tps"] = round(agg["tps"])
        agg["tps_spread"] = round(spread([r["tps"] for r in rows]), 3)
        agg["gbps_spread"] = round(spread([r["gbps"] for r in rows]), 3)
        agg["runs"] = [{k: round(v, 2) for k, v in r.items()} for r in rows]
        out[config] = agg
    return out


def ratios(configs: dict[str, Any]) -> dict[str, float]:
    n, f, t, i, c = (configs[k] for k in CONFIGS)
    return {
        "flagella_tc_vs_none_tps": round(t["tps"] / n["tps"], 3),
        "flagella_tc_vs_iptables_ct_tps": round(t["tps"] / c["tps"], 3),
        "flagella_vs_flagella_tc_tps": round(f["tps"] / t["tps"], 3),
        "flagella_vs_none_tps": round(f["tps"] / n["tps"], 3),
        "flagella_vs_iptables_tps": round(f["tps"] / i["tps"], 2),
        "flagella_vs_iptables_ct_tps": round(f["tps"] / c["tps"], 3),
        "flagella_vs_none_gbps": round(f["gbps"] / n["gbps"], 3),
        "flagella_vs_iptables_gbps": round(f["gbps"] / i["gbps"], 2),
        "flagella_vs_iptables_ct_gbps": round(f["gbps"] / c["gbps"], 3),
    }


LABELS = {
    "none": "(a) no program, no rule",
    "flagella": "(b) Flagella (tcx links), 10k policy + ipcache entries",
    "flagella-tc": "(b-tc) Flagella (clsact filters), same maps",
    "iptables": "(c) iptables, 10k-rule FORWARD chain",
    "iptables-ct": "(c') same chain behind conntrack ESTABLISHED",
}


def markdown_table(configs: dict[str, Any]) -> str:
    rows = ["| configuration | RTT avg µs | RTT p50 µs | RTT p99 µs | transactions/s | vs (a) | iperf3 Gbit/s | vs (a) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = configs["none"]
    for k in CONFIGS:
        c = configs[k]
        rows.append(f"| {LABELS[k]} | {c['rtt_avg_us']:.1f} | {c['rtt_p50_us']:.1f} | {c['rtt_p99_us']:.1f} | "
                    f"{c['tps']:,} | {c['tps'] / base['tps']:.3f} | {c['gbps']:.2f} | {c['gbps'] / base['gbps']:.3f} |")
    return "\n".join(rows)


COST_NOTE = """The cached path before and after its last trim (plain instead of locked adds for
a conntrack entry's counters; forwarded packets counted in a per-CPU array instead of a
per-CPU hash), 4 alternating `--quick --cost-only` runs of each build on 2026-12-04,
medians: `from_pod` 159.4 -> 149.8 ns, `to_pod` 142.7 -> 133.0 ns per run."""

AGENT_LOAD_NOTE = """A separate `--quick --load agent` run (2026-11-25, before the resolver indexed CIDR
peers and before the conntrack verdict cache) imported the 9,992 CIDRs through the agent in
229 s and measured the same (b)/(a) request rate as `--load maps` at the time (0.862). The
resolver now answers CIDR peers from a label index and a supernet index: bench/policy.py's
CIDR scale check imports 5,000 CIDRs over 100 endpoints in about 5 s."""


def _para(text: str, bullet: bool = False) -> str:
    lead = "* " if bullet else ""
    return textwrap.fill(" ".join(text.split()), width=90, initial_indent=lead,
                         subsequent_indent="  " if bullet else "", break_on_hyphens=False)


def report_section(result: dict[str, Any]) -> str:
    s, r, e, p, plan = result["setup"], result["ratios"], result["endpoint_create"], result["policy_change"], result["plan"]
    t, small, cidr = result["targets"], result["small_maps"], result["cidr_import"]
    mark = {True: "met", False: "**missed**"}
    if s["load"] == "maps":
        loaded = (f"the agent imported the pods' policies; the other {s['other_identities']:,} allow entries "
                  f"(CIDR identities the server admits on port {OTHERS_PORT}) and their ipcache entries were "
                  f"written straight into the pinned maps with `PolicyMap.set_many`/`IPCache.set_many` "
                  f"({s['load_others_s']} s), the agent's sync controller slowed to once a day so that it keeps "
                  f"them. Importing them as a policy through the agent (`--load agent`) is too slow for a "
                  f"5-minute run: {cidr['cidrs']:,} CIDRs in one `fromCIDRSet` took {cidr['import_s']} s in this "
                  f"run. {AGENT_LOAD_NOTE}")
    else:
        loaded = (f"all imported as policies through the agent (the {s['other_identities']:,} others as one "
                  f"`fromCIDRSet` rule, which took {s['load_others_s']} s).")
    out = [
        "## Datapath",
        f"Measured {result['date']} on {result['machine']}, in {result['wall_s']:.0f} s:",
        f"```sh\n{result['command']}\n```",
        _para(f"""Two pods (client, server) made by the real agent (`flagella agent`, driven over its
            socket) inside a private node network namespace. Request/response is `sockperf ping-pong
            --tcp -m 64 --full-rtt` (one 64-byte request in flight, {plan['sockperf_s']:g} s;
            transactions/s = replies / run time); bulk is one `iperf3` TCP stream
            ({plan['iperf_s']:g} s). Both ends of both tools are pinned to one CPU (CPU
            {result['bench_cpu']}): unpinned, cross-vCPU wake-ups on this VM swing the rate by about
            ±50% between runs; pinned, by a few percent. The five configurations rotate within each of
            {plan['reps']} repetitions; figures are medians of the repetitions."""),
        markdown_table(result["configs"]),
        "\n".join([
            _para(f"""(b): the agent's programs on both pods' host veths; client and server each enforce
                ingress and egress, so every request runs conntrack at an egress and an ingress hook,
                whose entries hold the verdict of the connection's first packet (the policy lookup
                runs again after every generation bump, i.e. after every map change the agent makes),
                and every reply the conntrack reply path. The agent attached them as
                {s['attach_mode']} ({'pinned tcx links' if s['attach_mode'] == 'tcx' else 'clsact filters'});
                (b-tc) runs the same programs and maps from clsact filters, the fallback for kernels
                without tcx. {s['policy_entries']:,} policy
                entries and {s['ipcache_entries']:,} ipcache entries: {loaded}""", bullet=True),
            _para(f"""(c): {s['iptables_rules']:,} rules in a chain of our own jumped to from FORWARD
                (`{s['iptables']}`): {s['iptables_other_rules']:,} `-s <other> -d <server> -p tcp --dport
                {OTHERS_PORT} -j ACCEPT`, then the client's two ports, then the two reply rules
                (`--sport`), then DROP: every packet, both directions, walks the whole list. (c') puts
                `-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT` first, as iptables-based policy
                engines install it: only each connection's SYN walks the list.""", bullet=True),
        ]),
        "\n".join([
            "| target | result | |", "|---|---:|---|",
            f"| (b)/(a) request rate ≥ 0.95 | {r['flagella_vs_none_tps']:.3f} | {mark[t['flagella_vs_none_tps>=0.95']]} |",
            f"| (b) ≥ 5× (c) request rate | {r['flagella_vs_iptables_tps']:.1f}× | {mark[t['flagella_vs_iptables_tps>=5']]} |",
            f"| (b)/(c') request rate ≥ 1.05 | {r['flagella_vs_iptables_ct_tps']:.3f} | {mark[t['flagella_vs_iptables_ct_tps>=1.05']]} |",
            f"| (b-tc)/(a) request rate, clsact (no target) | {r['flagella_tc_vs_none_tps']:.3f} | |",
            f"| (b-tc)/(c') request rate, clsact (no target) | {r['flagella_tc_vs_iptables_ct_tps']:.3f} | |",
            f"| (b)/(b-tc) request rate, tcx over clsact (no target) | {r['flagella_vs_flagella_tc_tps']:.3f} | |",
            f"| (b)/(a) iperf3 throughput (no target) | {r['flagella_vs_none_gbps']:.3f} | |",
        ]),
    ]
    if small is not None:
        out.append(_para(f"""With only the pods' own entries left ({small['policy_entries']} policy,
            {small['ipcache_entries']} ipcache; {small['reps']} more alternating runs, request rate only),
            (b)/(a) is {small['flagella_vs_none_tps']:.3f}: the cost is the programs' fixed work per
            packet, not the size of the maps."""))
    c = result["program_cost"]["programs"]
    out.append(_para(f"""Per program, under (b)'s ping-pong in a phase of its own (kernel BPF statistics,
        `sysctl kernel.bpf_stats_enabled=1`, `bpftool prog show` run_time_ns / run_cnt; the
        statistics add two clock reads to every run, so the matrix runs without them):
        `from_pod` {c['from_pod']['ns_per_run']} ns per run, `to_pod` {c['to_pod']['ns_per_run']} ns
        ({c['from_pod']['runs']:,} and {c['to_pod']['runs']:,} runs, {result['program_cost']['runs_per_transaction']}
        hook runs per transaction); the policy halves ran {c['policy_from_pod']['runs']} and
        {c['policy_to_pod']['runs']} times: every packet of the established connection passed from
        the conntrack verdict cache. {COST_NOTE}"""))
    out += [
        "Control plane, same agent:",
        "\n".join([
            _para(f"""`endpoint.create` until enforced (the call returns once the pod, identity, maps and
                programs are in place), {e['endpoints']} endpoints over the socket: p50 {e['p50_ms']} ms,
                p99 {e['p99_ms']} ms (max {e['max_ms']} ms). A denied connection tried right after each
                return (its SYN left at most {e['probe_after_return_max_ms']} ms later) was dropped for
                {e['denied_dropped']}/{e['endpoints']}; the allowed one opened for
                {e['allowed_open']}/{e['endpoints']}. Through the CLI (`flagella endpoint create`, a new
                process) it takes {', '.join(map(str, e['cli_process_ms']))} ms, mostly Python
                start-up.""", bullet=True),
            _para(f"""A policy change reaching {p['endpoints']} endpoints (`policy.import` of a policy
                selecting all of them, then of new versions changing its port): median
                {p['median_s'] * 1000:.0f} ms, max {p['max_s'] * 1000:.0f} ms over {p['imports']} imports.
                The call returns after writing; reading the pinned policy map right after found every
                endpoint's new entry (and not the old one) {p['verified']}/{p['imports']} times. (Creating
                those {p['endpoints']} endpoints: p50 {p['fleet_create_p50_ms']} ms, p99
                {p['fleet_create_p99_ms']} ms each.)""", bullet=True),
        ]),
        _para(f"""Noise: spread (max−min)/median over the repetitions, transactions/s:
            {', '.join(f"{k} {v['tps_spread']:.1%}" for k, v in result['configs'].items())}; iperf3:
            {', '.join(f"{k} {v['gbps_spread']:.1%}" for k, v in result['configs'].items())}. The machine
            is shared: other test runs use both CPUs at times."""),
    ]
    return "\n\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short repetition, fewer endpoints")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--cost-only", action="store_true",
                    help="only measure ns per run of each program under (b)'s ping-pong, print it, write nothing")
    ap.add_argument("--load", choices=("maps", "agent"), default="maps",
                    help="write the 10k other entries into the pinned maps (default), or import them "
                         "as a policy through the agent (minutes: CIDR selectors are matched pairwise)")
    ap.add_argument("--policy-only", action="store_true",
                    help="only endpoint create and the 100-endpoint policy change (no traffic, "
                         "no write): prints their figures")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/datapath.py needs root (namespaces, tc, bpf)", file=sys.stderr)
        return 2
    plan = Plan.for_args(args.quick)
    command = " ".join([".venv/bin/python bench/datapath.py", *sys.argv[1:]])
    for what in sweep_stale():
        print(f"removed stale {what}", file=sys.stderr)
    sh(str(NETGUARD), "on")
    workdir = Path(f"/tmp/flagella-bench-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bench = None
    try:
        with NodeNamespace(os.getpid()) as node:
            bench = DatapathBench(node, workdir, plan, args.load)
            try:
                say("setting up the agent, pods and 10k entries ...")
                bench.start()
                say(json.dumps(bench.setup))
                if args.cost_only:
                    print(json.dumps(bench.program_cost(), indent=2))
                    return 0
                if args.policy_only:
                    say("endpoint create ...")
                    ep = bench.endpoint_create()
                    say("policy change ...")
                    pol = bench.policy_change()
                    print(json.dumps({"command": command, "setup": bench.setup,
                                      "endpoint_create": ep, "policy_change": pol}, indent=2))
                    return 0
                runs = bench.run_matrix()
                cost = bench.program_cost()
                small = bench.small_maps()
                say("endpoint create ...")
                ep = bench.endpoint_create()
                say("policy change ...")
                pol = bench.policy_change()
                say("CIDR policy import through the agent ...")
                cidr = bench.cidr_import()
            except BaseException:
                print(bench.agent.log_tail(), file=sys.stderr)
                raise
            finally:
                bench.close()
    finally:
        if bench is not None:
            remove_bpf_dir(bench.agent.bpf_dir)
        sh("rm", "-rf", str(workdir), check=False)
    configs = summarize(runs)
    rat = ratios(configs)
    result = {
        "command": command,
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} vCPUs ({_cpu_model()}), Linux {platform.release()}",
        "bench_cpu": BENCH_CPU,
        "plan": plan.__dict__,
        "setup": bench.setup,
        "configs": configs,
        "ratios": rat,
        "targets": {"flagella_vs_none_tps>=0.95": rat["flagella_vs_none_tps"] >= 0.95,
                    "flagella_vs_iptables_tps>=5": rat["flagella_vs_iptables_tps"] >= 5,
                    "flagella_vs_iptables_ct_tps>=1.05": rat["flagella_vs_iptables_ct_tps"] >= 1.05},
        "endpoint_create": ep,
        "policy_change": pol,
        "small_maps": small,
        "program_cost": cost,
        "cidr_import": cidr,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))
    print()
    print(markdown_table(configs))
    if not args.no_write:
        path = REPO / "BENCHMARKS.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n\n"
        path.write_text(replace_section(text, "## Datapath", report_section(result)))
        print(f"\nwrote the ## Datapath section of {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
