"""The end-to-end conformance runner's moving parts: agent, world, pods, probes.

Topology (root namespace = the host)::

    pod netns x-a ... (made by the agent: endpoint.create)      world netns e2eworld<pid>
      eth0 10.244.1.10  <-veth->  fl<hash>   root   e2ew<pid>  <-veth->  eth0 198.51.100.10/32 ...
      podserver.py, prober.py                routes:                     podserver.py --addrs ...
                                             10.244.x.y/32 -> fl<hash>   prober.py
                                             198.51.100.n/32 -> e2ew<pid>

* `Agent` runs ``flagella agent`` as a subprocess with its own state dir, socket
  and bpf dir, and is spoken to with `flagella.cli._client.call`.
* `World` is a namespace of ours holding one TEST-NET address per corpus
  external address (see `tests.support.e2e_plan`), with a server and a prober.
* `Cluster` keeps the pods alive between cases and reuses identical ones (the
  standard 3x3 cluster is created once); labels are set exactly per case/step.
* `run_case` applies each step and probes the whole table in parallel.

Besides the probes, each step checks one datapath invariant: the kernel
ipcache maps every live pod address to that pod's identity (a policy must not
change who a pod is). At each case start the runner also checks that its pods'
veths and namespaces still exist: another agent starting in the root namespace
removes every Flagella pod it has no record of.

Everything this module creates is removed by the ``close``/``stop`` methods,
which the fixtures call in ``finally`` blocks; the agent gets SIGTERM if the
runner dies, and `sweep_stale` removes what a killed runner left (pods listed
in its marker file, its world, its bpf dir).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flagella.datapath.port import pod_netns_name

from . import host
from .e2e_plan import STANDARD_IPS, CasePlan, Peer, PodPlan, ProbePlan, StepPlan
from .host import FLAGELLA, PYTHON, REPO, pid_alive, remove_bpf_dir, sh
from .kafka_broker import NetnsBroker

E2E_DIR = REPO / "tests" / "e2e"

#: Probe timeouts (seconds). A drop is a timeout, so these bound each step's duration.
TCP_TIMEOUT = 1.0
UDP_TIMEOUT = 0.5  # x2: one retry
ICMP_TIMEOUT = 1.0
#: The client library of the conformance Kafka probes (the guide test runs both).
KAFKA_CLIENT = "confluent-kafka"
#: What a client surfaces when the proxy refused a request (TopicAuthorizationException).
KAFKA_REFUSALS = ("TOPIC_AUTHORIZATION_FAILED",)
#: An expected-allow probe that timed out is tried once more, alone-ish, with this timeout.
RECHECK_TIMEOUT = 3.0

ROUTE_PROTO = "205"  # the agent's routes (flagella.datapath.links.ROUTE_PROTOCOL)
#: ``<pid>-<tag>.json``: the pod netns names a runner asked its agent for, so a later run can
#: remove the pods of a runner that was killed (its agent's state dir is gone with it).
MARKER_DIR = Path("/run/flagella-e2e")


def prepare_host() -> None:
    """Root, bcc, the tools and netguard on (`HostUnavailable` names what is missing)."""
    host.prepare("nft", bcc=True, flagella=True)


def sweep_stale() -> list[str]:
    """Remove worlds, links and bpf dirs left by runner processes that died."""
    removed = host.sweep_stale(
        r"e2eworld(\d+)[a-z0-9]*", links=r"e2ew(\d+)[a-z0-9]*", bpf_dirs=r"flagella-e2e-(\d+).*"
    )
    for marker in MARKER_DIR.glob("*.json") if MARKER_DIR.is_dir() else []:
        m = re.match(r"(\d+)-", marker.name)
        if m and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError, ValueError):
                removed += [f"stale pod {x}" for x in remove_pod_leftovers(set(json.loads(marker.read_text())))]
            marker.unlink(missing_ok=True)
    return removed


def flagella_pods() -> dict[str, str]:
    """Pods of any Flagella agent in the root namespace: host veth name -> netns (its ifalias)."""
    from flagella.datapath.links import host_ifname_for

    out = {}
    for link in json.loads(sh("ip", "-j", "-d", "link", "show", check=False).stdout or "[]"):
        alias = link.get("ifalias")
        if alias and link.get("ifname") == host_ifname_for(alias):
            out[link["ifname"]] = alias
    return out


def remove_pod_leftovers(netns_names: set[str]) -> list[str]:
    """Remove the netns and host veths of these pods if they are still there; say what was left."""
    from flagella.datapath.links import host_ifname_for

    left = []
    present = set(sh("ip", "netns", "list", check=False).stdout.split())
    for name in sorted(netns_names):
        ifname = host_ifname_for(name)
        if sh("ip", "link", "show", ifname, check=False).returncode == 0:
            sh("ip", "link", "del", ifname, check=False)
            left.append(f"veth {ifname} ({name})")
        if name in present:
            sh("ip", "netns", "del", name, check=False)
            left.append(f"netns {name}")
    return left


# -- JSON-lines helper processes ------------------------------------------------------------------


class HelperDied(RuntimeError):
    pass


class JsonLines:
    """A helper process speaking JSON lines; requests with an ``id`` are answered out of order."""

    _ids = itertools.count(1)

    def __init__(self, argv: list[str], name: str, log_path: Path, ready_timeout: float = 15.0) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1
        )
        self.pending: dict[int, Future[dict[str, Any]]] = {}
        self.control: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, name=f"reader-{name}", daemon=True)
        self.reader.start()
        self.ready = self._control(ready_timeout)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            fut = None
            if isinstance(msg, dict) and "id" in msg:
                with self.lock:
                    fut = self.pending.pop(msg["id"], None)
            if fut is not None:
                fut.set_result(msg)
            else:
                self.control.put(msg)
        with self.lock:
            left, self.pending = self.pending, {}
        for fut in left.values():
            fut.set_exception(HelperDied(f"{self.name} exited ({self.proc.poll()}); see {self.log_path}"))
        self.control.put(None)

    def _control(self, timeout: float) -> dict[str, Any]:
        try:
            msg = self.control.get(timeout=timeout)
        except queue.Empty:
            raise HelperDied(f"{self.name}: no answer in {timeout}s; see {self.log_path}") from None
        if msg is None:
            raise HelperDied(f"{self.name} exited ({self.proc.poll()}): {self.stderr_tail()}")
        return msg

    def stderr_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise HelperDied(f"{self.name}: {exc}") from None

    def request(self, obj: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        self.send(obj)
        return self._control(timeout)

    def submit(self, obj: dict[str, Any]) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        ident = next(self._ids)
        with self.lock:
            self.pending[ident] = fut
        try:
            self.send({**obj, "id": ident})
        except HelperDied as exc:
            with self.lock:
                self.pending.pop(ident, None)
            fut.set_exception(exc)
        return fut

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self._log.close()


def _in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return argv if netns is None else ["ip", "netns", "exec", netns, *argv]


class PodServer(JsonLines):
    def __init__(self, netns: str, ports: set[tuple[int, str]], log_dir: Path, addrs: list[str] | None = None) -> None:
        argv = [PYTHON, "-u", str(E2E_DIR / "podserver.py"), "--ports", _ports_arg(ports)]
        if addrs:
            argv += ["--addrs", ",".join(addrs)]
        super().__init__(_in_netns(netns, argv), f"podserver[{netns}]", log_dir / f"server-{netns}.log")
        self.listening = set(self.ready.get("listening", []))

    def listen(self, ports: set[tuple[int, str]]) -> None:
        want = {f"{p}/{proto}" for p, proto in ports} - self.listening
        if not want:
            return
        r = self.request({"listen": sorted(want)})
        if not r.get("ok"):
            raise RuntimeError(f"{self.name}: cannot listen on {sorted(want)}: {r.get('error')}")
        self.listening = set(r["listening"])


class Prober(JsonLines):
    def __init__(self, netns: str | None, log_dir: Path) -> None:
        label = netns or "host"
        argv = [PYTHON, "-u", str(E2E_DIR / "prober.py")]
        super().__init__(_in_netns(netns, argv), f"prober[{label}]", log_dir / f"prober-{label}.log")


def _ports_arg(ports: set[tuple[int, str]]) -> str:
    return ",".join(f"{p}/{proto}" for p, proto in sorted(ports))


# -- the agent ---------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the runner dies, so a killed run leaves no agent behind."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


#: The node proxy's listeners in e2e runs (not the defaults, which a user's agent may hold).
PROXY_INGRESS_PORT, PROXY_EGRESS_PORT = 15301, 15302


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Agent:
    """``flagella agent`` as a subprocess, with its own state dir, socket and bpf dir."""

    def __init__(self, workdir: Path, tag: str, ipv6_cidr: str = "fd00:10:244::/64", metrics_addr: str = "") -> None:
        self.workdir = workdir
        self.metrics_addr = metrics_addr
        self.state_dir = workdir / "state"
        self.socket = str(workdir / "state" / "flagella.sock")
        self.bpf_dir = Path(f"/sys/fs/bpf/flagella-e2e-{os.getpid()}{tag}")
        self.config = workdir / "agent.yaml"
        self.log_path = workdir / "agent.log"
        self.ipv6_cidr = ipv6_cidr
        self.proc: subprocess.Popen[bytes] | None = None
        self._routes_before: set[str] = set()
        self._nft_before: set[str] = set()

    @staticmethod
    def _nft_tables() -> set[str]:
        out = sh("nft", "list", "tables", check=False).stdout
        return {line.strip() for line in out.splitlines() if line.startswith("table")}

    @staticmethod
    def _agent_routes() -> set[str]:
        out = set()
        for fam in ("-4", "-6"):
            p = sh("ip", fam, "-j", "route", "show", "proto", ROUTE_PROTO, "type", "unreachable", check=False)
            for r in json.loads(p.stdout or "[]"):
                out.add(f"{fam} {r['dst']}")
        return out

    def start(self, timeout: float = 120.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # The node proxy is on: HTTP rules are enforced by the agent's own Envoy. Names,
        # ports and the base id are this run's, so concurrent runs do not collide.
        tag = f"{os.getpid() % 100000}"
        self.config.write_text(
            "network:\n  ipv4_cidr: 10.244.0.0/16\n" f"  ipv6_cidr: \"{self.ipv6_cidr}\"\n"
            "proxy:\n  enabled: true\n"
            f"  ingress_port: {PROXY_INGRESS_PORT}\n  egress_port: {PROXY_EGRESS_PORT}\n"
            f"  reentry_ifname: fle2e{tag}a\n  reentry_peer: fle2e{tag}b\n"
            f"  nft_table: flagella_e2e_{tag}\n  envoy_base_id: {20000 + os.getpid() % 20000}\n"
            f"  admin_port: {_free_port()}\n"
        )
        self._routes_before = self._agent_routes()
        self._nft_before = self._nft_tables()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [
                FLAGELLA, "agent", "--config", str(self.config), "--state-dir", str(self.state_dir),
                "--socket", self.socket, "--metrics-addr", self.metrics_addr, "--bpf-dir", str(self.bpf_dir),
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flagella agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            p = subprocess.run([FLAGELLA, "status", "--socket", self.socket], capture_output=True, text=True)
            if p.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"flagella agent not answering after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        from flagella.cli._client import call

        return call(self.socket, method, params or {}, timeout=120.0)

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # The agent leaves its Envoy running on purpose (restarts keep L7 enforced).
        sh("pkill", "-f", f"{self.state_dir}/envoy/", check=False)
        remove_bpf_dir(self.bpf_dir)
        if self.proc is None:
            return
        # What the agent added to the host and nobody had before it started.
        for route in self._agent_routes() - self._routes_before:
            fam, dst = route.split(" ", 1)
            sh("ip", fam, "route", "del", "unreachable", dst, "proto", ROUTE_PROTO, check=False)
        for table in self._nft_tables() - self._nft_before:
            if table.split()[-1] == "flagella" or table.split()[-1].startswith("flagella_e2e_"):
                sh("nft", "delete", *table.split(), check=False)


# -- the world ---------------------------------------------------------------------------------------


class World:
    """Our stand-in for everything outside the cluster: one netns, TEST-NET addresses only."""

    GATEWAY = "169.254.1.1"

    def __init__(self, tag: str, addresses: list[str], serve: set[tuple[int, str]], log_dir: Path) -> None:
        self.netns = f"e2eworld{os.getpid()}{tag}"
        self.host_if = f"e2ew{os.getpid()}{tag}"[:15]
        self.addresses = sorted(addresses)
        self.serve = serve
        self.log_dir = log_dir
        self.server: PodServer | None = None
        self.prober: Prober | None = None

    def create(self) -> None:
        for a in self.addresses:
            if not (a.startswith("198.51.100.") or a.startswith("203.0.113.")):
                raise ValueError(f"world address {a} is not TEST-NET-2/3")
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        sh("sysctl", "-q", "-w", f"net.ipv4.conf.{self.host_if}.rp_filter=0", f"net.ipv4.conf.{self.host_if}.forwarding=1")
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "link", "set", "lo", "up", netns=self.netns)
        sh("ip", "link", "set", "eth0", "up", netns=self.netns)
        host_mac = json.loads(sh("ip", "-j", "link", "show", self.host_if).stdout)[0]["address"]
        world_mac = json.loads(sh("ip", "-j", "link", "show", "eth0", netns=self.netns).stdout)[0]["address"]
        for a in self.addresses:
            sh("ip", "addr", "add", f"{a}/32", "dev", "eth0", netns=self.netns)
            sh("ip", "route", "replace", f"{a}/32", "dev", self.host_if)
            sh("ip", "neigh", "replace", a, "lladdr", world_mac, "dev", self.host_if, "nud", "permanent")
        sh("ip", "neigh", "replace", self.GATEWAY, "lladdr", host_mac, "dev", "eth0", "nud", "permanent", netns=self.netns)
        sh("ip", "route", "replace", "default", "via", self.GATEWAY, "dev", "eth0", "onlink", netns=self.netns)
        self.server = PodServer(self.netns, self.serve, self.log_dir, addrs=self.addresses)
        self.prober = Prober(self.netns, self.log_dir)

    def destroy(self) -> None:
        for helper in (self.prober, self.server):
            if helper is not None:
                with contextlib.suppress(Exception):
                    helper.close()
        sh("ip", "link", "del", self.host_if, check=False)  # its routes and neighbours go with it
        sh("ip", "netns", "del", self.netns, check=False)


class BridgedWorld(World):
    """The world of a multi-node run: a namespace of ours on the nodes' bridge (in
    ``fabric``), holding the TEST-NET addresses and ``ip`` on the bridge's subnet. The
    nodes route the TEST-NET addresses to ``ip``; the world routes each pod to its node
    (`MultiNodeCluster` keeps both). Deleting the namespace removes its veth."""

    def __init__(
        self, addresses: list[str], serve: set[tuple[int, str]], log_dir: Path, fabric: str, bridge: str, ip: str
    ) -> None:
        super().__init__("mnw", addresses, serve, log_dir)
        self.netns = f"sys-{os.getpid()}mnw-world"
        self.fabric, self.bridge, self.ip = fabric, bridge, ip

    def create(self) -> None:
        for a in self.addresses:
            if not (a.startswith("198.51.100.") or a.startswith("203.0.113.")):
                raise ValueError(f"world address {a} is not TEST-NET-2/3")
        sh("ip", "netns", "add", self.netns)
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        sh("ip", "-n", self.fabric, "link", "add", "world0", "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        sh("ip", "-n", self.fabric, "link", "set", "world0", "master", self.bridge, "up")
        sh("ip", "-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        for a in self.addresses:
            sh("ip", "-n", self.netns, "addr", "add", f"{a}/32", "dev", "eth0")
        sh("ip", "-n", self.netns, "link", "set", "eth0", "up")
        self.server = PodServer(self.netns, self.serve, self.log_dir, addrs=self.addresses)
        self.prober = Prober(self.netns, self.log_dir)

    def destroy(self) -> None:
        for helper in (self.prober, self.server):
            if helper is not None:
                with contextlib.suppress(Exception):
                    helper.close()
        sh("ip", "netns", "del", self.netns, check=False)


# -- pods and cases ------------------------------------------------------------------------------------


@dataclass
class LivePod:
    plan: PodPlan
    ep: dict[str, Any]
    labels: dict[str, str]
    server: PodServer
    prober: Prober | None = None
    brokers: list[NetnsBroker] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return str(self.ep["netns"])


def _kv(labels: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in sorted(labels.items())]


def _policy_source(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{doc.get('kind')} {ns}{meta.get('name')}"


class Cluster:
    """The pods on the agent, kept between cases; identical pods are reused."""

    def __init__(self, agent: Agent, world: World | None, log_dir: Path, family: int = 4, tag: str = "") -> None:
        self.marker = MARKER_DIR / f"{os.getpid()}-{tag or family}.json"
        self.agent = agent
        self.world = world
        self.log_dir = log_dir
        self.family = family
        self.pods: dict[str, LivePod] = {}
        self.ns_labels: dict[str, dict[str, str]] = {}
        self.host_prober: Prober | None = None
        self.created = 0
        self.deleted = 0
        #: every pod netns the agent made (or may have made) for us: checked to be gone at the end
        self.netns_seen: set[str] = set()

    # pods
    def _create(self, pp: PodPlan) -> None:
        self.netns_seen.add(pod_netns_name(pp.namespace, pp.name))
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(json.dumps(sorted(self.netns_seen)))
        ep = self.agent.call(
            "endpoint.create",
            {
                "name": pp.name,
                "namespace": pp.namespace,
                "labels": _kv(pp.labels),
                "namespace_labels": [],
                "service_account": pp.service_account,
                "ipv4": pp.ipv4,
                "ipv6": pp.ipv6,
                "named_ports": list(pp.named_ports),
            },
        )
        self.created += 1
        if ep.get("netns") not in self.netns_seen:
            self.netns_seen.add(str(ep.get("netns")))
            self.marker.write_text(json.dumps(sorted(self.netns_seen)))
        try:
            if ep.get("ipv4") != pp.ipv4 or (pp.ipv6 and ep.get("ipv6") != pp.ipv6):
                raise RuntimeError(f"{pp.key}: asked for {pp.ipv4}/{pp.ipv6}, got {ep.get('ipv4')}/{ep.get('ipv6')}")
            server = PodServer(ep["netns"], set(pp.serve), self.log_dir)
        except BaseException:
            with contextlib.suppress(Exception):
                self.agent.call("endpoint.delete", {"name": pp.key})
            raise
        live = LivePod(pp, ep, dict(ep.get("labels") or pp.labels), server)
        self.pods[pp.key] = live
        for port in sorted(pp.kafka_ports):
            # A Kafka broker where the case probes Kafka (its topics seeded with one record).
            broker = NetnsBroker(ep["netns"], pp.ipv4, port, pp.kafka_topics, python=PYTHON)
            live.brokers.append(broker)
            broker.start()

    def _delete(self, key: str) -> None:
        live = self.pods.pop(key)
        for helper in (live.prober, live.server):
            if helper is not None:
                with contextlib.suppress(Exception):
                    helper.close()
        for broker in live.brokers:
            with contextlib.suppress(Exception):
                broker.stop()
        self.agent.call("endpoint.delete", {"name": key})
        self.deleted += 1

    def set_namespace_labels(self, ns: str, labels: dict[str, str]) -> None:
        current = self.ns_labels.get(ns, {})
        if current == labels and ns in self.ns_labels:
            return
        got = self.agent.call(
            "namespace.labels",
            {"namespace": ns, "set": _kv(labels), "unset": sorted(set(current) - set(labels))},
        )
        self.ns_labels[ns] = dict(got)
        if got != labels:
            raise RuntimeError(f"namespace {ns}: labels are {got}, wanted {labels}")

    def set_pod_labels(self, key: str, labels: dict[str, str]) -> None:
        live = self.pods[key]
        if live.labels == labels:
            return
        ep = self.agent.call(
            "endpoint.labels",
            {"name": key, "set": _kv(labels), "unset": sorted(set(live.labels) - set(labels))},
        )
        live.labels = dict(ep.get("labels") or {})
        if live.labels != labels:
            raise RuntimeError(f"pod {key}: labels are {live.labels}, wanted {labels}")

    def vanished(self) -> list[str]:
        """Live pods whose host veth or netns is gone (removed by something outside this run)."""
        links = {x.get("ifname") for x in json.loads(sh("ip", "-j", "link", "show", check=False).stdout or "[]")}
        spaces = set(sh("ip", "netns", "list", check=False).stdout.split())
        return [
            key for key, live in sorted(self.pods.items())
            if live.ep.get("host_ifname") not in links or live.netns not in spaces
        ]

    def prepare(self, plan: CasePlan) -> list[str]:
        """Make the agent hold exactly the case's pods (reusing identical ones) at their base labels.

        Returns the incidents found on the way (pods that vanished since the last case).
        """
        incidents = []
        for key in self.vanished():
            live = self.pods[key]
            incidents.append(
                f"pod {key}: host veth {live.ep.get('host_ifname')} or netns {live.netns} vanished since the "
                "previous case (removed outside this run?); recreating it"
            )
            with contextlib.suppress(Exception):
                self._delete(key)
            self.pods.pop(key, None)
        wanted_ips = {p.ipv4: k for k, p in plan.pods.items()} | {p.ipv6: k for k, p in plan.pods.items() if p.ipv6}
        for key, live in list(self.pods.items()):
            want = plan.pods.get(key)
            clash = any(wanted_ips.get(a, key) != key for a in (live.plan.ipv4, live.plan.ipv6) if a)
            idle_ok = want is None and live.plan.ipv4 in {str(i) for i in STANDARD_IPS}
            if clash or (want is not None and want.spec() != live.plan.spec()) or (want is None and not idle_ok):
                self._delete(key)
        for ns, labels in plan.namespaces.items():
            self.set_namespace_labels(ns, labels)
        for key, pp in sorted(plan.pods.items()):
            if key in self.pods:
                self.set_pod_labels(key, pp.labels)
                self.pods[key].plan = pp
                self.pods[key].server.listen(set(pp.serve))
            else:
                self._create(pp)
        if self.world is not None and self.world.server is not None:
            self.world.server.listen(plan.world_serve)
        return incidents

    def apply_step(self, step: StepPlan) -> None:
        for ns, labels in step.namespace_labels.items():
            self.set_namespace_labels(ns, labels)
        for key, labels in step.pod_labels.items():
            self.set_pod_labels(key, labels)
        revision = self.agent.call("policy.delete", {"all": True})["revision"]
        if step.policies:
            revision = self.agent.call(
                "policy.import",
                {"documents": step.policies, "sources": [_policy_source(d) for d in step.policies]},
            )["revision"]
        # An import returns before enforcers confirm it (policy import --wait waits).
        lagging = self.agent.call("policy.wait", {"revision": revision, "timeout": 60})["lagging"]
        if lagging:
            raise RuntimeError(f"step {step.number}: revision {revision} not realized by {lagging}")
        got = self.agent.call("policy.get", {})["policies"]
        names = sorted(_policy_source(d) for d in got)
        want = sorted(_policy_source(d) for d in step.policies)
        if names != want:
            raise RuntimeError(f"step {step.number}: agent holds policies {names}, wanted {want}")

    def ipcache_errors(self) -> list[str]:
        """Live pods whose addresses the kernel ipcache does not map to their identity."""
        rows = {r["prefix"]: r["identity"] for r in self.agent.call("bpf.ipcache", {})}
        errors = []
        eps = {f"{e['namespace']}/{e['name']}": e for e in self.agent.call("endpoint.list", {})}
        for key in sorted(self.pods):
            ep = eps.get(key)
            if ep is None:
                errors.append(f"{key}: the agent has no such endpoint")
                continue
            for addr in (ep.get("ipv4"), ep.get("ipv6")):
                if not addr:
                    continue
                prefix = f"{addr}/{128 if ':' in addr else 32}"
                got = rows.get(prefix)
                if got != ep.get("identity"):
                    errors.append(f"ipcache {prefix} -> {got}, but {key} has identity {ep.get('identity')}")
        return errors

    def finish_case(self, plan: CasePlan) -> None:
        """Delete the case's policies and put back the labels its steps changed."""
        self.agent.call("policy.delete", {"all": True})
        for ns, labels in plan.namespaces.items():
            self.set_namespace_labels(ns, labels)
        for key, pp in plan.pods.items():
            if key in self.pods:
                self.set_pod_labels(key, pp.labels)

    def close(self) -> None:
        errors = []
        for key in list(self.pods):
            try:
                self._delete(key)
            except Exception as exc:
                errors.append(f"{key}: {exc}")
        if self.host_prober is not None:
            self.host_prober.close()
        if errors:
            raise RuntimeError("endpoint cleanup failed: " + "; ".join(errors))

    # probing
    def prober_for(self, peer: Peer) -> Prober:
        if peer.kind == "pod":
            live = self.pods[peer.key]
            if live.prober is None:
                live.prober = Prober(live.netns, self.log_dir)
            return live.prober
        if peer.kind == "world":
            assert self.world is not None and self.world.prober is not None
            return self.world.prober
        if self.host_prober is None:
            self.host_prober = Prober(None, self.log_dir)
        return self.host_prober

    def probe(self, probes: list[ProbePlan], recheck: bool = True) -> list[Outcome]:
        outcomes = [Outcome(pp) for pp in probes]
        self._run([o for o in outcomes if o.plan.action != "skip"], None)
        if recheck:
            slow = [o for o in outcomes if o.plan.action == "check" and o.plan.probe.expect == "allow" and o.result == "timeout"]
            if slow:
                self._run(slow, RECHECK_TIMEOUT)
                for o in slow:
                    o.rechecked = True
        return outcomes

    def _run(self, outcomes: list[Outcome], timeout: float | None) -> None:
        futures = []
        for o in outcomes:
            pp = o.plan
            assert pp.src is not None and pp.dst is not None
            req: dict[str, Any] = {"kind": pp.kind, "addr": pp.dst.address}
            if pp.kind == "tcp":
                req.update(port=pp.port, timeout=timeout or TCP_TIMEOUT, http=pp.http)
            elif pp.kind == "kafka":
                assert pp.kafka is not None
                req.update(port=pp.port, timeout=timeout or TCP_TIMEOUT, client=KAFKA_CLIENT, **pp.kafka)
            elif pp.kind == "udp":
                req.update(port=pp.port, timeout=timeout or UDP_TIMEOUT, retries=1)
            else:
                req.update(icmp_type=pp.icmp_type, timeout=timeout or ICMP_TIMEOUT)
            if pp.src.kind == "world":
                req["src"] = pp.src.address
            try:
                futures.append((o, self.prober_for(pp.src).submit(req)))
            except Exception as exc:
                o.result, o.detail = "error", f"{exc.__class__.__name__}: {exc}"
        for o, fut in futures:
            try:
                r = fut.result(timeout=60)
                o.result, o.detail, o.ms = r.get("result", "error"), r.get("detail", ""), r.get("ms", 0.0)
                o.http_status = r.get("http_status")
                o.kafka_error = r.get("kafka_error")
            except (FutureTimeout, HelperDied) as exc:
                o.result, o.detail = "error", f"{exc.__class__.__name__}: {exc}"

    def link_state(self, keys: set[str]) -> str:
        """Addresses, routes and host veth of pods whose probes failed with an error."""
        out = []
        for key in sorted(keys):
            live = self.pods.get(key)
            if live is None:
                continue
            ns, host_if = live.netns, str(live.ep.get("host_ifname"))
            cmds = [("ip", "-br", "addr"), ("ip", "route"), ("ip", "-6", "route")]
            out.append(f"--- {key} (netns {ns}, host veth {host_if})")
            for cmd in cmds:
                p = sh(*cmd, netns=ns, check=False)
                out.append(f"  $ {' '.join(cmd)}\n" + (p.stdout or p.stderr).rstrip())
            p = sh("ip", "-br", "link", "show", host_if, check=False)
            out.append(f"  host: {(p.stdout or p.stderr).strip()}")
        return "\n".join(out)

    def diagnostics(self, keys: set[str]) -> str:
        out = []
        for key in sorted(keys):
            if key not in self.pods:
                continue
            try:
                ep = self.agent.call("endpoint.get", {"name": key})
                rows = self.agent.call("bpf.policy", {"name": key})
            except Exception as exc:
                out.append(f"--- {key}: {exc}")
                continue
            enf = ep.get("policy_enforcement", {})
            out.append(
                f"--- flagella bpf policy get {key}  (endpoint {ep.get('id')}, identity {ep.get('identity')}, "
                f"enforcing ingress={enf.get('ingress')} egress={enf.get('egress')}, ipv4 {ep.get('ipv4')}, ipv6 {ep.get('ipv6')})"
            )
            out.append(format_policy_rows(rows))
            idents = sorted({r["identity"] for r in rows if r.get("identity")} | {ep.get("identity")} - {None})
            for ident in idents:
                try:
                    labels = self.agent.call("identity.get", {"id": ident}).get("labels", [])
                except Exception as exc:
                    labels = [f"? {exc}"]
                out.append(f"    identity {ident}: {','.join(labels)}")
        return "\n".join(out)


# -- the multi-node option ------------------------------------------------------------------------------


@dataclass
class NodeHandle:
    """One node of a multi-node run: its agent (anything with ``call``), netns and node IP."""

    agent: Any
    netns: str
    ip: str


def pod_to_pod(probe: ProbePlan) -> bool:
    """A probe the multi-node option runs: both peers are pods."""
    return all(x is not None and x.kind == "pod" for x in (probe.src, probe.dst))


def place_by_address(ipv4: str, nodes: int) -> int:
    """A pod's node in a multi-node run: the last byte of its IPv4 address modulo the node
    count. Stable across cases (a reused pod stays put), and the standard cluster's pods
    of each namespace (.10, .11, .12) land on different nodes."""
    return int(ipv4.rsplit(".", 1)[1]) % nodes


#: Why a probe is not run across nodes (world probes, when no world is attached).
MULTINODE_SKIP = "multi-node run: the world is not attached to the nodes"


class MultiNodeCluster(Cluster):
    """The runner with its pods spread over several nodes (`place_by_address`).

    Each node is an agent in a network namespace of its own, sharing etcd with the
    others (tests/multinode/_harness.py builds them). Per pod, its node's agent creates,
    relabels and deletes it, and the other nodes get a /32 route to it via its node IP
    (every node has the same pod CIDR, the plan's addresses). Namespace labels and
    policies go to every agent: each node enforces for its own pods. After every change
    the runner waits until each node's kernel ipcache maps every pod of every node to its
    identity (remote ones arrive through etcd); that is also the per-step invariant.
    A probe from the host runs in the destination pod's node namespace; the world, when
    given, is a `BridgedWorld` on the nodes' bridge (without it, world probes are skipped).
    IPv4 only.
    """

    converge_timeout_s = 30.0

    def __init__(
        self, nodes: list[NodeHandle], log_dir: Path, tag: str = "mn", world: BridgedWorld | None = None
    ) -> None:
        super().__init__(nodes[0].agent, world, log_dir, 4, tag)
        self.nodes = nodes
        if world is not None:
            for node in nodes:
                for a in world.addresses:
                    sh("ip", "-n", node.netns, "route", "replace", f"{a}/32", "via", world.ip)
        self.placement: dict[str, int] = {}
        # Not in MARKER_DIR: the pods' netns carry the agents' pod_netns_prefix, and the
        # root-namespace sweep must never be handed the corpus' unprefixed names.
        self.marker = log_dir / f"pods-{tag}.json"
        self._node_probers: dict[int, Prober] = {}

    @contextlib.contextmanager
    def _on(self, node: NodeHandle) -> Any:
        home, self.agent = self.agent, node.agent
        try:
            yield
        finally:
            self.agent = home

    def node_of(self, key: str) -> NodeHandle:
        return self.nodes[self.placement[key]]

    def _routes(self, pp: PodPlan, op: str) -> None:
        owner = self.node_of(pp.key)
        via = ["via", owner.ip] if op != "del" else []
        spaces = [n.netns for n in self.nodes if n is not owner]
        if isinstance(self.world, BridgedWorld):
            spaces.append(self.world.netns)
        for netns in spaces:
            sh("ip", "-n", netns, "route", op, f"{pp.ipv4}/32", *via, check=op != "del")

    def _create(self, pp: PodPlan) -> None:
        self.placement[pp.key] = place_by_address(pp.ipv4, len(self.nodes))
        with self._on(self.node_of(pp.key)):
            super()._create(replace(pp, ipv6=None))
        self.pods[pp.key].plan = pp  # the plan as asked, so prepare() reuses the pod
        self._routes(pp, "replace")

    def _delete(self, key: str) -> None:
        pp = self.pods[key].plan
        with self._on(self.node_of(key)):
            super()._delete(key)
        self._routes(pp, "del")

    def set_namespace_labels(self, ns: str, labels: dict[str, str]) -> None:
        if self.ns_labels.get(ns) == labels and ns in self.ns_labels:
            return
        current = self.ns_labels.get(ns, {})
        for node in self.nodes:
            got = node.agent.call(
                "namespace.labels",
                {"namespace": ns, "set": _kv(labels), "unset": sorted(set(current) - set(labels))},
            )
            if got != labels:
                raise RuntimeError(f"namespace {ns} on {node.netns}: labels are {got}, wanted {labels}")
        self.ns_labels[ns] = dict(labels)

    def set_pod_labels(self, key: str, labels: dict[str, str]) -> None:
        with self._on(self.node_of(key)):
            super().set_pod_labels(key, labels)

    def vanished(self) -> list[str]:
        gone = []
        for key, live in sorted(self.pods.items()):
            node = self.node_of(key)
            links = {x.get("ifname") for x in json.loads(sh("ip", "-n", node.netns, "-j", "link", "show", check=False).stdout or "[]")}
            if live.ep.get("host_ifname") not in links or live.netns not in host.netns_names():
                gone.append(key)
        return gone

    def prepare(self, plan: CasePlan) -> list[str]:
        incidents = super().prepare(plan)
        self.converge()
        return incidents

    def apply_step(self, step: StepPlan) -> None:
        for node in self.nodes:
            with self._on(node):
                super().apply_step(step)
        self.converge()

    def finish_case(self, plan: CasePlan) -> None:
        for node in self.nodes:
            with self._on(node):
                super().finish_case(plan)
        self.converge()  # restored labels reach the other nodes before the runner checks

    def ipcache_errors(self) -> list[str]:
        """Every node's kernel ipcache maps every live pod (of any node) to its identity."""
        identities: dict[str, int] = {}
        for node in self.nodes:
            for e in node.agent.call("endpoint.list", {}):
                identities[f"{e['namespace']}/{e['name']}"] = e.get("identity")
        errors = []
        for node in self.nodes:
            rows = {r["prefix"]: r["identity"] for r in node.agent.call("bpf.ipcache", {})}
            for key in sorted(self.pods):
                if key not in identities:
                    errors.append(f"{key}: no agent has such an endpoint")
                    continue
                got = rows.get(f"{self.pods[key].plan.ipv4}/32")
                if got != identities[key]:
                    errors.append(
                        f"{node.netns}: ipcache {self.pods[key].plan.ipv4}/32 -> {got}, "
                        f"but {key} has identity {identities[key]}"
                    )
        return errors

    def converge(self) -> None:
        deadline = time.monotonic() + self.converge_timeout_s
        while (errors := self.ipcache_errors()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if errors:
            raise RuntimeError(f"nodes did not converge in {self.converge_timeout_s}s: {'; '.join(errors[:5])}")

    def probe(self, probes: list[ProbePlan], recheck: bool = True) -> list[Outcome]:
        """Pod-to-pod probes as on one node; a probe from the host runs on the destination
        pod's node (its host is that node's namespace); world probes are skipped."""
        placed = [
            replace(p, action="skip", reason=MULTINODE_SKIP)
            if p.action != "skip" and not pod_to_pod(p) and not self._host_probe(p) and not self._world_probe(p)
            else p
            for p in probes
        ]
        merged: list[Outcome | None] = [None] * len(placed)
        for i, node in enumerate(self.nodes):
            mine = [
                p
                if p.action == "skip" or ((pod_to_pod(p) or self._world_probe(p)) and i == 0) or self._host_probe(p, i)
                else replace(p, action="skip")
                for p in placed
            ]
            if i and all(p.action == "skip" for p in mine):
                continue
            self.host_prober = self._node_probers.get(i) or Prober(node.netns, self.log_dir)
            self._node_probers[i] = self.host_prober
            for j, outcome in enumerate(super().probe(mine, recheck)):
                if merged[j] is None or mine[j].action != "skip":
                    merged[j] = replace(outcome, plan=placed[j]) if mine[j].action == "skip" else outcome
        self.host_prober = None
        return [o for o in merged if o is not None]

    def _world_probe(self, p: ProbePlan) -> bool:
        """A probe between a pod and the world, when the world is attached."""
        kinds = {x.kind for x in (p.src, p.dst) if x is not None}
        return self.world is not None and kinds == {"pod", "world"}

    def _host_probe(self, p: ProbePlan, node: int | None = None) -> bool:
        """A probe from the host to a pod (on ``node``, if given)."""
        if p.src is None or p.src.kind != "host" or p.dst is None or p.dst.kind != "pod":
            return False
        return node is None or self.placement.get(p.dst.key) == node

    def close(self) -> None:
        try:
            super().close()
        finally:
            for prober in self._node_probers.values():
                prober.close()

    def diagnostics(self, keys: set[str]) -> str:
        out = []
        for i, node in enumerate(self.nodes):
            mine = {k for k in keys if self.placement.get(k) == i}
            if mine:
                with self._on(node):
                    out.append(f"=== node {node.netns}\n" + super().diagnostics(mine))
        return "\n".join(out)


def format_policy_rows(rows: list[dict[str, Any]]) -> str:
    header = ["DIRECTION", "IDENTITY", "PROTO", "PORTS", "VERDICT", "PROXY", "PACKETS", "BYTES"]
    cells = [header] + [
        [str(x) for x in (r.get("direction"), r.get("identity") or "any", r.get("protocol") or "any", r.get("ports"),
                          r.get("verdict"), r.get("proxy_port") or "", r.get("packets"), r.get("bytes"))]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells) or "(no entries)"


# -- outcomes and reports ---------------------------------------------------------------------------


@dataclass
class Outcome:
    plan: ProbePlan
    result: str = ""  # open | timeout | refused | unreachable | error
    detail: str = ""
    ms: float = 0.0
    http_status: int | None = None
    #: kind "kafka": the Kafka error the client surfaced ("" when the operation worked)
    kafka_error: str | None = None
    rechecked: bool = False

    @property
    def got(self) -> str:
        if self.result == "open" and self.plan.kind == "kafka":
            return "deny" if self.kafka_error else "allow"
        if self.result == "open":
            # An HTTP request the proxy refused: 403 with Cilium's body.
            return "deny" if self.plan.http and self.http_status == 403 else "allow"
        if self.result == "timeout":
            return "deny"
        return f"error ({self.result})"

    @property
    def agrees(self) -> bool:
        if self.got != self.plan.probe.expect:
            return False
        mode = (self.plan.probe.raw or {}).get("deny_mode")
        if self.got == "deny" and mode == "drop":
            return self.result == "timeout"
        if self.got == "deny" and mode == "l7-reject":
            if self.plan.kind == "kafka":
                # A Kafka answer, not a dropped connection (spec 10(b)).
                return self.kafka_error in KAFKA_REFUSALS
            return self.http_status == 403
        return True

    def describe(self) -> str:
        pp = self.plan
        extra = f" [{pp.reason}]" if pp.reason else ""
        re_ = " (rechecked)" if self.rechecked else ""
        return f"{pp.label}: expected {pp.probe.expect}, got {self.got}{re_}: {self.detail}{extra}"


@dataclass
class CaseReport:
    id: str
    family: int
    checked: int = 0
    agreed: int = 0
    skipped: int = 0
    info: int = 0
    info_disagree: int = 0
    steps: int = 0
    seconds: float = 0.0
    skip_reasons: Counter[str] = field(default_factory=Counter)
    disagreements: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    diagnostics: list[str] = field(default_factory=list)
    info_notes: list[str] = field(default_factory=list)
    #: the exception that aborted the case (agent call failed, helper died, ...)
    aborted: str = ""

    @property
    def ok(self) -> bool:
        return not self.disagreements and not self.harness_errors and not self.aborted

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        if self.checked == 0 and self.ok:
            status = "SKIP"
        if self.aborted:
            status = "ERR"
        extra = f" loopback {self.info}" + (f" ({self.info_disagree} differ)" if self.info_disagree else "")
        return (
            f"{status:4s} IPv{self.family} {self.id:55s} checked {self.checked:4d} agreed {self.agreed:4d} "
            f"skipped {self.skipped:4d}{extra}  {self.seconds:5.1f}s"
        )

    def failure_text(self) -> str:
        parts = [self.line()]
        if self.aborted:
            parts.append(f"aborted: {self.aborted}")
        if self.harness_errors:
            parts.append("errors (ipcache inconsistencies; probe results that are neither allow nor deny):")
            parts += [f"  {d}" for d in self.harness_errors]
        if self.disagreements:
            parts.append(f"{len(self.disagreements)} probes disagree:")
            parts += [f"  {d}" for d in self.disagreements]
        parts += self.diagnostics
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "family": self.family, "checked": self.checked, "agreed": self.agreed,
            "skipped": self.skipped, "loopback": self.info, "loopback_differ": self.info_disagree,
            "seconds": round(self.seconds, 2), "skip_reasons": dict(self.skip_reasons),
            "disagreements": self.disagreements, "harness_errors": self.harness_errors,
            "aborted": self.aborted, "diagnostics": self.diagnostics,
        }


#: Every case report of this process (printed by tests/e2e/conftest.py at the end).
REPORTS: list[CaseReport] = []


def run_case(cluster: Cluster, plan: CasePlan) -> CaseReport:
    report = CaseReport(plan.id, cluster.family)
    start = time.monotonic()
    try:
        report.harness_errors += cluster.prepare(plan)
        for step in plan.steps:
            cluster.apply_step(step)
            report.harness_errors += [f"step {step.number}: {e}" for e in cluster.ipcache_errors()]
            outcomes = cluster.probe(step.probes)
            report.steps += 1
            involved: set[str] = set()
            for o in outcomes:
                pp = o.plan
                if pp.action == "skip":
                    report.skipped += 1
                    report.skip_reasons[pp.reason] += 1
                    continue
                if pp.action == "info":
                    report.info += 1
                    if not o.agrees:
                        report.info_disagree += 1
                        report.info_notes.append(f"step {step.number}: {o.describe()}")
                    continue
                report.checked += 1
                if o.agrees:
                    report.agreed += 1
                    continue
                text = f"step {step.number}: {o.describe()}"
                if o.result in ("open", "timeout"):
                    report.disagreements.append(text)
                else:
                    report.harness_errors.append(text)
                involved |= {p.key for p in (pp.src, pp.dst) if p is not None and p.kind == "pod"}
            if involved:
                report.diagnostics.append(f"== {plan.id} step {step.number}: policy maps of the involved endpoints")
                report.diagnostics.append(cluster.diagnostics(involved))
            broken = {
                p.key
                for o in outcomes
                if o.result not in ("open", "timeout", "")
                for p in (o.plan.src, o.plan.dst)
                if p is not None and p.kind == "pod"
            }
            if broken:
                report.diagnostics.append(f"== {plan.id} step {step.number}: links of pods with probe errors")
                report.diagnostics.append(cluster.link_state(broken))
    except Exception as exc:
        report.aborted = f"{exc.__class__.__name__}: {exc}"
        with contextlib.suppress(Exception):
            cluster.finish_case(plan)
        raise
    else:
        cluster.finish_case(plan)
        left = cluster.ipcache_errors()
        if left:
            # Let the agent's sync controller repair it, so the next case starts clean.
            deadline = time.monotonic() + 15
            while cluster.ipcache_errors() and time.monotonic() < deadline:
                time.sleep(0.5)
            fixed = "repaired by the agent's sync controller" if not cluster.ipcache_errors() else "NOT repaired in 15 s"
            report.harness_errors += [f"after the case (policies deleted): {e} ({fixed})" for e in left]
    finally:
        report.seconds = time.monotonic() - start
        REPORTS.append(report)
    return report


def summary_lines(reports: list[CaseReport]) -> list[str]:
    lines = [r.line() for r in reports]
    by_family: dict[int, list[CaseReport]] = {}
    for r in reports:
        by_family.setdefault(r.family, []).append(r)
    for fam, rs in sorted(by_family.items()):
        reasons: Counter[str] = Counter()
        for r in rs:
            reasons.update(r.skip_reasons)
        lines.append(
            f"IPv{fam}: {len(rs)} cases, {sum(r.ok for r in rs)} pass; probes checked {sum(r.checked for r in rs)}, "
            f"agreed {sum(r.agreed for r in rs)}, skipped {sum(r.skipped for r in rs)}, loopback (info) "
            f"{sum(r.info for r in rs)}; {sum(r.seconds for r in rs):.1f}s in cases"
        )
        for reason, n in reasons.most_common():
            lines.append(f"    skipped {n:4d}: {reason}")
    return lines


def write_report(path: Path, reports: list[CaseReport]) -> None:
    path.write_text(json.dumps([r.to_json() for r in reports], indent=2))

