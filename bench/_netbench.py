"""Plumbing for the datapath benchmark: a private node namespace, load generators, parsers.

Theory of operation
-------------------
The benchmark must not touch the machine's own network (another engineer runs agents
and pods in the root namespace at the same time, and an agent's restore removes every
Flagella pod it finds in its namespace). So it builds a *node*: a network namespace
``bench-node-<pid>`` that the calling thread enters with ``setns(2)`` before any other
thread exists. Every process started from then on (the agent, iptables, tc, ``ip netns
exec``) forks from that thread and lives in the node, where the agent's veths, routes,
nftables table and the benchmark's iptables chain go. Pod namespaces are named
``bench_*-<pid>``. Leaving the node (``NodeNamespace.__exit__``) kills what it started
and deletes every namespace it made, so nothing outlives the run; `sweep_stale` removes
what a run killed with SIGKILL left behind (its pid is gone).

Processes are started with ``PR_SET_PDEATHSIG``: if the benchmark dies, they die too.

Load generators are the Debian ``sockperf`` (TCP ping-pong: one 64-byte request in
flight, round-trip latency) and ``iperf3`` (one TCP stream, throughput); their outputs
are parsed here into plain dicts.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
NETNS_DIR = Path("/var/run/netns")
BPF_ROOT = Path("/sys/fs/bpf")
_T = TypeVar("_T")


class BenchError(RuntimeError):
    """The benchmark could not set up or measure something; the message says what."""


# -- processes --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def sh(*argv: str, netns: str | None = None, check: bool = True, timeout: float = 60,
       stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin,
                       preexec_fn=_die_with_parent)
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:8])}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}")
    return p


def spawn(*argv: str, netns: str | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    cmd = list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# -- namespaces -------------------------------------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise BenchError(f"setns: {os.strerror(err)}")


def in_netns(name: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a short-lived thread inside namespace ``name`` (sockets it makes stay there)."""
    result: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]


class NodeNamespace:
    """``bench-node-<pid>``: entered by the calling thread; everything made in it dies with it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.name = f"bench-node-{pid}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._home: int | None = None

    def __enter__(self) -> NodeNamespace:
        if threading.active_count() != 1:
            raise BenchError("enter the node namespace before starting threads")
        sh("ip", "netns", "add", self.name)
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        fd = os.open(NETNS_DIR / self.name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        sh("ip", "link", "set", "lo", "up")
        return self

    def spawn(self, *argv: str, netns: str | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
        proc = spawn(*argv, netns=netns, log=log)
        self.procs.append(proc)
        return proc

    def pod_namespaces(self) -> list[str]:
        suffix = f"-{self.pid}"
        return [n for n in list_netns() if n.startswith(("bench-", "bench_")) and n.endswith(suffix) and n != self.name]

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                stop(proc)
        for name in self.pod_namespaces():
            sh("ip", "netns", "del", name, check=False)
        if self._home is not None:
            _setns(self._home)
            os.close(self._home)
        sh("ip", "netns", "del", self.name, check=False)


def list_netns() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]


def remove_bpf_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # unlinking a pin releases the object once unused


def sweep_stale() -> list[str]:
    """Remove the namespaces and bpf dirs of benchmark runs whose process is gone."""
    removed = []
    for name in list_netns():
        m = re.fullmatch(r"bench[-_][a-z0-9-]*?-(\d+)", name)
        if m and not pid_alive(int(m.group(1))):
            sh("ip", "netns", "del", name, check=False)
            removed.append(f"netns {name}")
    for d in [*BPF_ROOT.glob("flagella-bench-*"), *Path("/tmp").glob("flagella-bench-*")]:
        m = re.fullmatch(r"flagella-bench-(\d+)", d.name)
        if m and not pid_alive(int(m.group(1))):
            remove_bpf_dir(d)
            removed.append(f"dir {d}")
    return removed


# -- probes and load ----------------------------------------------------------------------------


def tcp_connect(netns: str, ip: str, port: int, timeout: float, started: list[float] | None = None) -> str:
    """Connect from inside ``netns``: 'open', 'refused' or 'timeout' (a silent drop).
    ``started`` receives the perf_counter() at which connect() was called."""

    def attempt() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            if started is not None:
                started.append(time.perf_counter())
            try:
                s.connect((ip, port))
            except TimeoutError:
                return "timeout"
            except ConnectionRefusedError:
                return "refused"
            return "open"

    return in_netns(netns, attempt)


LISTENER = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[2:]):
    s = socket.create_server((sys.argv[1], port), backlog=128)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.close()
"""


def wait_for_port(netns: str, ip: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while tcp_connect(netns, ip, port, 0.5) != "open":
        if time.monotonic() > deadline:
            raise BenchError(f"{ip}:{port} is not answering from {netns}")
        time.sleep(0.05)


_SOCKPERF_PCT = re.compile(r"--->\s+percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_SOCKPERF_AVG = re.compile(r"avg-(?:rtt|latency)=([\d.]+)")
_SOCKPERF_RUNTIME = re.compile(r"\[Valid Duration\]\s+RunTime=([\d.]+)\s+sec;\s+SentMessages=(\d+);\s+ReceivedMessages=(\d+)")


def sockperf_pingpong(netns: str, ip: str, port: int, seconds: float, size: int = 64,
                      cpu: int | None = None) -> dict[str, float]:
    """One TCP ping-pong run: round-trip avg/p50/p99 in µs and transactions per second."""
    pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
    argv = [*pin, "sockperf", "ping-pong", "--tcp", "-i", ip, "-p", str(port), "-t", str(seconds),
            "-m", str(size), "--full-rtt"]
    out = sh(*argv, netns=netns, timeout=seconds + 30).stdout
    pct = {float(q): float(v) for q, v in _SOCKPERF_PCT.findall(out)}
    avg = _SOCKPERF_AVG.search(out)
    run = _SOCKPERF_RUNTIME.search(out)
    if avg is None or run is None or 50.0 not in pct or 99.0 not in pct:
        raise BenchError(f"sockperf output not understood:\n{out[-1500:]}")
    runtime, received = float(run.group(1)), int(run.group(3))
    return {"rtt_avg_us": float(avg.group(1)), "rtt_p50_us": pct[50.0], "rtt_p99_us": pct[99.0],
            "tps": received / runtime}


def iperf3_gbps(netns: str, ip: str, port: int, seconds: float, cpu: int | None = None) -> float:
    pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
    out = sh(*pin, "iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-J", netns=netns,
             timeout=seconds + 30).stdout
    try:
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError) as exc:
        raise BenchError(f"iperf3 output not understood ({exc}):\n{out[-1500:]}") from None


# -- iptables -----------------------------------------------------------------------------------


def iptables_allowlist(chain: str, others: list[tuple[str, str, int]], allowed: list[tuple[str, str, int]],
                       replies: list[tuple[str, str, int]], scope: str, stateful: bool) -> str:
    """An ``iptables-restore --noflush`` ruleset: FORWARD jumps to ``chain`` for ``scope``
    traffic; ``chain`` accepts ``others`` then ``allowed`` (src, dst, dport), then the
    replies (src, dst, sport), then drops. ``stateful`` puts an ESTABLISHED accept first,
    as conntrack-based policy engines do; without it every packet walks the whole list."""
    lines = ["*filter", f":{chain} - [0:0]", f"-A FORWARD -s {scope} -d {scope} -j {chain}"]
    if stateful:
        lines.append(f"-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    lines += [f"-A {chain} -s {s}/32 -d {d}/32 -p tcp -m tcp --dport {p} -j ACCEPT" for s, d, p in others]
    lines += [f"-A {chain} -s {s}/32 -d {d}/32 -p tcp -m tcp --dport {p} -j ACCEPT" for s, d, p in allowed]
    lines += [f"-A {chain} -s {s}/32 -d {d}/32 -p tcp -m tcp --sport {p} -j ACCEPT" for s, d, p in replies]
    lines += [f"-A {chain} -j DROP", "COMMIT", ""]
    return "\n".join(lines)


# -- figures ------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a small sample."""
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, int(round(q / 100 * (len(ys) - 1)))))]


def spread(xs: list[float]) -> float:
    """(max - min) / median: how much the repetitions disagree."""
    m = median(xs)
    return (max(xs) - min(xs)) / m if m else 0.0


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the markdown section ``heading`` (up to the next ``## ``) replaced by
    ``body``, or ``body`` appended when the section is absent."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    block = body if body.endswith("\n") else body + "\n"
    if start is None:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + block
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + block + ("\n" + tail if tail else "")


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out
