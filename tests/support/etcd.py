"""A real etcd (Debian ``etcd-server``) on loopback, for tests and bench/identity.py.

Each instance has its own data dir and free ports, so concurrent test runs of
other engineers never share it. ``pause``/``resume`` (SIGSTOP/SIGCONT) make an
outage where connections hang; ``kill``/``start`` one where they are refused.
With ``netns``, etcd runs inside that network namespace (a machine of its own
on a test network, as the multi-node tests use it) on ``host``; its ports
are then the namespace's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy_in_netns(netns: str, url: str) -> bool:
    """GET ``url`` from a thread that entered ``netns`` (the thread dies with its namespace)."""
    result: list[bool] = []

    def probe() -> None:
        import ctypes

        with open(f"/var/run/netns/{netns}", "rb") as target:
            if ctypes.CDLL(None, use_errno=True).setns(target.fileno(), 0x40000000) != 0:
                return
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                result.append(b"true" in r.read())
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(3)
    return bool(result and result[0])


class EtcdServer:
    def __init__(self, netns: str | None = None, host: str = "127.0.0.1") -> None:
        self.binary = shutil.which("etcd")
        self.dir = Path(tempfile.mkdtemp(prefix="flagella-etcd-"))
        self.netns = netns
        self.host = host
        self.client_port = _free_port() if netns is None else 2379
        self.peer_port = _free_port() if netns is None else 2380
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def start(self, timeout_s: float = 15.0) -> EtcdServer:
        if self.binary is None:
            raise RuntimeError("etcd is not installed (Debian package etcd-server)")
        peer = f"http://{self.host}:{self.peer_port}"
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - the child keeps it
        enter = ["nsenter", f"--net=/var/run/netns/{self.netns}", "--"] if self.netns else []
        self.proc = subprocess.Popen(
            [
                *enter, self.binary, "--name", "t", "--data-dir", str(self.dir / "data"),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"t={peer}", "--log-level", "warn",
            ],
            stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {(self.dir / 'etcd.log').read_text()[-2000:]}")
            if self.netns is not None:
                if _healthy_in_netns(self.netns, self.endpoint + "/health"):
                    return self
                time.sleep(0.1)
                continue
            try:
                with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                    if b"true" in r.read():
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy")

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
