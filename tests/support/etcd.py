"""A real etcd (Debian ``etcd-server``) on loopback, for tests and bench/identity.py.

Each instance has its own data dir and free ports, so concurrent test runs of
other engineers never share it. ``pause``/``resume`` (SIGSTOP/SIGCONT) make an
outage where connections hang; ``kill``/``start`` one where they are refused.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self) -> None:
        self.binary = shutil.which("etcd")
        self.dir = Path(tempfile.mkdtemp(prefix="flagella-etcd-"))
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout_s: float = 15.0) -> EtcdServer:
        if self.binary is None:
            raise RuntimeError("etcd is not installed (Debian package etcd-server)")
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                self.binary, "--name", "t", "--data-dir", str(self.dir / "data"),
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
