"""Moving parts of the agent's system tests: agents, pods, sockets inside pods, map dumps.

Everything here runs for real: ``flagella agent`` subprocesses with their own state dir,
socket, metrics port and bpf pin dir (``/sys/fs/bpf/flagella-sys-<pid>-<tag>``), each in a
node network namespace of its own (``sys-<pid><tag>-node``, see `Agent`), pods that the agent
creates as network namespaces joined to that node, and traffic between those pods only.

Names and addresses, so that nothing collides with another engineer's run on this machine:

* Kubernetes namespaces are ``sys-<pid><tag>`` (a test's pods' netns are
  ``sys-<pid><tag>-<pod>``); `sweep_stale` removes those of dead pids, nodes included.
* Pod addresses are ``10.244.200.N`` and ``fd00:10:244::c8NN`` (`addr4`, `addr6`).

Sockets "in a pod" are created by this process after ``setns(2)`` into the pod's netns on
the calling thread (`in_netns`); a socket keeps the namespace it was created in, so probes
and servers run as threads of the test process without a helper per pod.

Cleanup is the callers' job, done in ``finally`` blocks: `Cluster.close` deletes the pods
(through the agent when it answers, by hand otherwise) and reports anything the agent left
behind; `Agent.close` stops the agent and removes its pin dir, state dir and node namespace
(with the veths, routes and nftables table the agent put there).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagella.datapath.port import pod_netns_name
from tests.support import host
from tests.support.host import FLAGELLA, netns_names, prepare, sh, wait_until

PID = os.getpid()
NS_PREFIX = f"sys-{PID}"

CLONE_NEWNET = 0x40000000
IP_MTU_DISCOVER = 10  # <linux/in.h>; the socket module only has these from Python 3.12
IP_PMTUDISC_DONT = 0
_libc = ctypes.CDLL(None, use_errno=True)


def addr4(n: int) -> str:
    assert 2 <= n <= 254
    return f"10.244.200.{n}"


def addr6(n: int) -> str:
    assert 2 <= n <= 254
    return f"fd00:10:244::c8{n:02x}"


def namespace(tag: str) -> str:
    """The Kubernetes namespace of one test's pods (and the prefix of their netns)."""
    return f"{NS_PREFIX}{tag}"


def prepare_host() -> None:
    """Root, bcc, the tools and netguard on (`HostUnavailable` names what is missing)."""
    prepare("nsenter", "bpftool", "iperf3", "ss", bcc=True, flagella=True)


# -- the host: node namespaces, pods, stale leftovers --------------------------------------------


def host_ifname_for(netns: str) -> str:
    from flagella.datapath.links import host_ifname_for as f

    return f(netns)


def links(node: str) -> list[dict[str, Any]]:
    """``ip -j -d link`` of a node namespace (where an agent keeps its pods' host veths)."""
    return list(json.loads(sh("ip", "-n", node, "-j", "-d", "link", "show", check=False).stdout or "[]"))


def remove_pod_by_hand(netns: str, node: str) -> list[str]:
    """Remove a pod's host veth (in ``node``) and netns if present; say what was there."""
    left = []
    ifname = host_ifname_for(netns)
    names = netns_names()
    if node in names and sh("ip", "-n", node, "link", "show", ifname, check=False).returncode == 0:
        sh("ip", "-n", node, "link", "del", ifname, check=False)
        left.append(f"veth {ifname} ({netns})")
    if netns in names:
        sh("ip", "netns", "del", netns, check=False)
        left.append(f"netns {netns}")
    return left


def sweep_stale() -> list[str]:
    """Remove namespaces and pin dirs left by system-test runs whose process died."""
    # A node takes its veths with it.
    return host.sweep_stale(r"sys-(\d+)[a-z0-9]+[-_].+", bpf_dirs=r"flagella-sys-(\d+).*")


# -- sockets inside pods -----------------------------------------------------------------------


@contextlib.contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Run the block with the calling thread in ``netns`` (sockets made here stay there)."""
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/var/run/netns/{netns}", "rb") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns(back from {netns}): {os.strerror(err)}")


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def pod_socket(netns: str, addr_family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    with in_netns(netns):
        return socket.socket(addr_family, kind)


def tcp_connect(netns: str, dst: str, port: int, timeout: float = 1.0, src: str | None = None) -> str:
    """One TCP connection attempt from a pod: ``open``, ``timeout`` (a drop), ``refused`` or ``error: ...``."""
    s = pod_socket(netns, family_of(dst), socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if src:
            s.bind((src, 0))
        s.connect((dst, port))
        return "open"
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"error: {exc}"
    finally:
        s.close()


def tcp_open(netns: str, dst: str, port: int, timeout: float = 2.0) -> socket.socket:
    s = pod_socket(netns, family_of(dst), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((dst, port))
    except BaseException:
        s.close()
        raise
    return s


class Servers:
    """Listening sockets in pods, served by daemon threads of this process; `close` stops all.

    TCP: accept, then echo what arrives. UDP: record (size, source) of every datagram and echo
    it back.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.udp: dict[tuple[str, int], queue.Queue[tuple[int, str]]] = {}
        self.tcp_peers: dict[tuple[str, int], list[str]] = {}

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _keep(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.append(s)

    def tcp_echo(self, netns: str, addr: str, port: int) -> None:
        s = pod_socket(netns, family_of(addr), socket.SOCK_STREAM)
        self._keep(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(64)
        s.settimeout(0.2)
        peers = self.tcp_peers.setdefault((addr, port), [])
        self._spawn(self._accept_loop, s, peers)

    def _accept_loop(self, s: socket.socket, peers: list[str]) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peers.append(peer[0])
            self._keep(conn)
            self._spawn(self._echo, conn)

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            with contextlib.suppress(OSError):
                conn.sendall(data)

    def udp_sink(self, netns: str, addr: str, port: int) -> queue.Queue[tuple[int, str]]:
        s = pod_socket(netns, family_of(addr), socket.SOCK_DGRAM)
        self._keep(s)
        s.bind((addr, port))
        q: queue.Queue[tuple[int, str]] = queue.Queue()
        self.udp[(addr, port)] = q
        self._spawn(self._udp_loop, s, q)
        return q

    def _udp_loop(self, s: socket.socket, q: queue.Queue[tuple[int, str]]) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([s], [], [], 0.2)
            if not ready:
                continue
            try:
                data, peer = s.recvfrom(65536)
            except OSError:
                return
            q.put((len(data), peer[0]))
            with contextlib.suppress(OSError):
                s.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
            self._sockets.clear()


def drain(q: queue.Queue[Any]) -> list[Any]:
    out = []
    with contextlib.suppress(queue.Empty):
        while True:
            out.append(q.get_nowait())
    return out


def udp_exchange(
    netns: str, dst: str, port: int, size: int, timeout: float, src: str | None = None, fragment: bool = False
) -> int | None:
    """Send one datagram of ``size`` bytes from a pod; the size of the echo, or None (dropped)."""
    fam = family_of(dst)
    s = pod_socket(netns, fam, socket.SOCK_DGRAM)
    try:
        if fragment and fam == socket.AF_INET:
            # DF off: the kernel fragments a datagram larger than the MTU instead of refusing it.
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        if src:
            s.bind((src, 0))
        s.settimeout(timeout)
        s.sendto(os.urandom(size), (dst, port))
        try:
            data, _ = s.recvfrom(65536)
        except TimeoutError:
            return None
        return len(data)
    finally:
        s.close()


# -- the agent ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Agent:
    """``flagella agent`` as a subprocess with its own state dir, socket, metrics port and pin dir.

    The agent runs in a node namespace of its own (``nsenter --net``, same mount namespace, so
    ``/sys/fs/bpf`` is the machine's): its pods' host veths, routes, sysctls and nftables table
    live there. An agent adopts every pod veth of its namespace on start and removes those it
    has no record of, so sharing the root namespace with another engineer's agent would let
    either destroy the other's pods; the node namespace also keeps pod traffic off the host.
    """

    def __init__(
        self, workdir: Path, tag: str, sync_interval_s: float = 1.0, attach_mode: str = "auto",
        network: str = "{ipv4_cidr: 10.244.0.0/16}", extra_config: str = "", proxy: str = "",
        extra_settings: str = "",
    ) -> None:
        """``network``, ``proxy`` (flow-style YAML mappings), ``extra_config`` and
        ``extra_settings`` (YAML lines, e.g. ``istio: {enabled: true}``) go into the agent's
        settings file."""
        self.workdir = workdir
        self.tag = tag
        self.node = f"{NS_PREFIX}{tag}-node"
        self.state_dir = workdir / "state"
        self.socket = str(self.state_dir / "flagella.sock")
        self.bpf_dir = Path(f"/sys/fs/bpf/flagella-sys-{PID}-{tag}")
        self.metrics_port = free_port()
        self.config = workdir / "settings.yaml"
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: More ``flagella agent`` flags (e.g. the ``--k8s-*`` ones), given at every start.
        self.args: list[str] = []
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"state_dir: {self.state_dir}\n"
            f"socket: {self.socket}\n"
            f"bpf_dir: {self.bpf_dir}\n"
            f"metrics_addr: 127.0.0.1:{self.metrics_port}\n"
            f"controllers: {{sync_interval_s: {sync_interval_s}}}\n"
            f"network: {network}\n"
            f"attach_mode: {attach_mode}\n"
            # The node proxy is on by default; its Envoy's shared memory is host-wide, so
            # each test agent gets a base id of its own (the rest lives in the node netns).
            f"proxy: {proxy or f'{{envoy_base_id: {free_port()}, admin_port: {free_port()}}}'}\n"
            + extra_config + extra_settings
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> float:
        """Start the agent and wait until it answers; return the seconds that took."""
        assert not self.alive, "agent already running"
        if self.node not in netns_names():
            sh("ip", "netns", "add", self.node)
            sh("ip", "-n", self.node, "link", "set", "lo", "up")
        start = time.monotonic()
        with open(self.log_path, "ab") as log:
            # nsenter execs the agent: the child's pid is the agent's.
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{self.node}", "--", FLAGELLA, "agent", "--config", str(self.config), *self.args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = start + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flagella agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.call("status", timeout=2.0)
                return time.monotonic() - start
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"flagella agent not answering after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> float:
        """SIGTERM and wait (SIGKILL after ``timeout``); return the seconds the exit took."""
        if not self.alive:
            return 0.0
        assert self.proc is not None
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"the agent ignored SIGTERM for {timeout}s") from None
        return time.monotonic() - start

    def kill9(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        from flagella.cli._client import call

        return call(self.socket, method, params or {}, timeout=timeout)

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [FLAGELLA, *args, "--socket", self.socket], capture_output=True, text=True, timeout=timeout
        )
        if check and p.returncode != 0:
            raise AssertionError(f"flagella {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
        return p

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def metrics(self) -> str:
        with in_netns(self.node):  # urlopen's socket is made here, in the node namespace
            conn = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
        with conn:
            return str(conn.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample (0 when absent)."""
        want = {f'{k}="{v}"' for k, v in labels.items()}
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
            if not m or m.group(1) != name:
                continue
            have = set(re.findall(r'\w+="[^"]*"', m.group(2) or ""))
            if want <= have:
                return float(m.group(3))
        return 0.0

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def log_events(self, event: str) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict) and rec.get("event") == event:
                        out.append(rec)
        return out

    def close(self) -> None:
        """Stop the agent; remove its pin dir, state dir and node namespace."""
        try:
            if self.alive:
                with contextlib.suppress(AssertionError):  # stop() killed it after the timeout
                    self.stop()
        finally:
            # The agent leaves its node proxy's Envoy running on purpose (it keeps
            # enforcing across agent restarts); the test is over, so stop it.
            subprocess.run(["pkill", "-f", f"{self.state_dir}/envoy/"], check=False)
            shutil.rmtree(self.bpf_dir, ignore_errors=True)
            shutil.rmtree(self.state_dir, ignore_errors=True)
            # Its veths, routes and nftables table go with it.
            sh("ip", "netns", "del", self.node, check=False)


# -- pods ----------------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    namespace: str
    n: int  # address index: 10.244.200.<n>, fd00:10:244::c8<n>
    ep: dict[str, Any] = field(default_factory=dict)

    @property
    def netns(self) -> str:
        return pod_netns_name(self.namespace, self.name)

    @property
    def ipv4(self) -> str:
        return addr4(self.n)

    @property
    def ipv6(self) -> str:
        return addr6(self.n)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def ip(self, family: int) -> str:
        return self.ipv4 if family == 4 else self.ipv6


class Cluster:
    """Pods of one test on one agent, with the servers and helper processes it runs in them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.pods: dict[str, Pod] = {}
        self.netns_seen: set[str] = set()
        self.servers = Servers()
        self.procs: list[subprocess.Popen[Any]] = []
        self.policies: list[tuple[str, str]] = []  # (namespace, name)

    def create(
        self, name: str, ns: str, n: int, labels: dict[str, str] | None = None,
        namespace_labels: dict[str, str] | None = None, istio_sidecar: bool = False,
        service_account: str | None = None,
    ) -> Pod:
        pod = Pod(name, ns, n)
        self.netns_seen.add(pod.netns)
        pod.ep = self.agent.call(
            "endpoint.create",
            {
                "name": name,
                "namespace": ns,
                "labels": [",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))] if labels else [],
                "namespace_labels": (
                    [",".join(f"{k}={v}" for k, v in sorted(namespace_labels.items()))] if namespace_labels else []
                ),
                "ipv4": pod.ipv4,
                "ipv6": pod.ipv6,
                **({"istio_sidecar": True} if istio_sidecar else {}),
                **({"service_account": service_account} if service_account else {}),
            },
        )
        assert pod.ep["netns"] == pod.netns, pod.ep
        assert pod.ep["ipv4"] == pod.ipv4 and pod.ep["ipv6"] == pod.ipv6, pod.ep
        self.pods[pod.key] = pod
        return pod

    def delete(self, pod: Pod) -> None:
        self.agent.call("endpoint.delete", {"name": pod.key})
        self.pods.pop(pod.key, None)

    def import_policy(self, *docs: dict[str, Any]) -> int:
        """Import policy documents and wait until every endpoint enforces the new revision."""
        for d in docs:
            meta = d["metadata"]
            self.policies.append((meta.get("namespace", "default"), meta["name"]))
        r = self.agent.call("policy.import", {"documents": list(docs), "sources": [d["metadata"]["name"] for d in docs]})
        revision = int(r["revision"])
        wait_until(
            lambda: not self.agent.call("policy.wait", {"revision": revision})["waiting"],
            timeout=60, what=f"endpoints to enforce revision {revision}",
        )
        return revision

    def spawn(self, netns: str, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(["ip", "netns", "exec", netns, *argv], start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def close(self) -> list[str]:
        """Stop everything; delete the pods and policies; return what had to be removed by hand."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        self.servers.close()
        problems: list[str] = []
        if self.agent.alive:
            for ns, name in sorted(set(self.policies)):
                with contextlib.suppress(Exception):
                    self.agent.call("policy.delete", {"names": [name], "namespace": ns})
            for pod in list(self.pods.values()):
                try:
                    self.delete(pod)
                except Exception as exc:
                    problems.append(f"endpoint delete {pod.key}: {exc}")
        for name in sorted(self.netns_seen):
            left = remove_pod_by_hand(name, self.agent.node)
            if left and self.agent.alive:
                problems.append(f"left behind by the agent (removed now): {', '.join(left)}")
        return problems


# -- monitor -------------------------------------------------------------------------------------


class Monitor:
    """``flagella monitor --type drop -o json`` in the background; events collected by a thread."""

    def __init__(self, agent: Agent, kind: str = "drop") -> None:
        self.proc = subprocess.Popen(
            [FLAGELLA, "monitor", "--type", kind, "-o", "json", "--socket", agent.socket],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # The monitor has subscribed once the CLI is connected: give it a moment to import.
        wait_until(lambda: self._subscribed(agent), timeout=10, what="the monitor to connect")
        time.sleep(0.3)  # the agent registers the subscriber right after reading the request

    def _subscribed(self, agent: Agent) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"monitor exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
        # The CLI holds a unix connection to the agent once it has sent its subscription.
        out = sh("ss", "-xp", check=False).stdout
        return f"pid={self.proc.pid}," in out

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                with self._lock:
                    self.events.append(ev)

    def matching(self, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if pred(e)]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._reader.join(timeout=2)


# -- kernel maps through bpftool -------------------------------------------------------------------


def bpftool_dump(agent: Agent, name: str) -> list[dict[str, Any]]:
    p = sh("bpftool", "-j", "map", "dump", "pinned", str(agent.bpf_dir / name))
    return list(json.loads(p.stdout or "[]"))


def hex_bytes(raw: list[str]) -> list[str]:
    """bpftool's ``["0x01", ...]`` as the ``01 ...`` words ``bpftool map ... key hex`` takes."""
    return [b[2:].rjust(2, "0") for b in raw]



# -- drift repair: tamper right after a sync run, then probe -----------------------------------------


def sync_runs(agent: Agent) -> int:
    status = agent.call("status")
    return int(next(c["runs"] for c in status["controllers"] if c["name"] == "sync-maps"))


def just_after_sync(agent: Agent, sync_s: float) -> None:
    runs = sync_runs(agent)
    wait_until(lambda: sync_runs(agent) > runs, timeout=3 * sync_s, interval=0.01, what="a sync-maps run")


def tamper_until_observed(
    agent: Agent, sync_s: float, tamper: Callable[[], None], repaired: Callable[[], bool],
    probe: Callable[[], bool], what: str,
) -> tuple[int, float]:
    """Tamper right after a sync run and probe (``probe`` says whether traffic showed the
    damage); repeat while the repair beat the probes, at most three times.

    Returns (tampers made, seconds from the last tamper to its repair).
    """
    for attempt in range(1, 4):
        just_after_sync(agent, sync_s)
        t0 = time.monotonic()
        tamper()
        observed = probe()
        wait_until(repaired, timeout=sync_s + 2.0, interval=0.02, what=f"the repair of {what}")
        took = time.monotonic() - t0
        if observed:
            return attempt, took
    raise AssertionError(f"{what}: three tampers in a row were repaired before traffic could show them")


# -- policies and traffic expectations -------------------------------------------------------------


def cnp_ingress(name: str, ns: str, selector: dict[str, str], peer: dict[str, str], ports: list[tuple[int, str]]) -> dict[str, Any]:
    """A CiliumNetworkPolicy: pods matching ``selector`` accept ``peer`` pods on ``ports``."""
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "endpointSelector": {"matchLabels": selector},
            "ingress": [
                {
                    "fromEndpoints": [{"matchLabels": peer}],
                    "toPorts": [{"ports": [{"port": str(p), "protocol": proto} for p, proto in ports]}],
                }
            ],
        },
    }


ALLOW_TIMEOUT = 2.0  # an allowed connection on a veth answers in well under a millisecond
DENY_TIMEOUT = 0.5  # a drop shows as a connect timeout


def assert_allowed(src: Pod, dst: str, port: int, what: str = "") -> None:
    got = tcp_connect(src.netns, dst, port, ALLOW_TIMEOUT)
    assert got == "open", f"{what or 'allowed flow'}: {src.key} -> {dst}:{port}/TCP: {got}, expected open"


def assert_denied(src: Pod, dst: str, port: int, what: str = "") -> None:
    got = tcp_connect(src.netns, dst, port, DENY_TIMEOUT)
    assert got == "timeout", f"{what or 'denied flow'}: {src.key} -> {dst}:{port}/TCP: {got}, expected a drop (timeout)"
