"""Which container runtime runs on this node, from the sockets it listens on.

`detect_runtime` looks for the runtimes' API sockets under a root (``/`` on a node,
``/host`` in the agent's container) and answers the first that accepts a
connection: a stale socket file left by a stopped daemon does not count.
``--container-runtime`` (`K8sSettings.container_runtime`) forces one.
"""

from __future__ import annotations

import socket
from pathlib import Path

from flagella.errors import InputError
from flagella.k8s.translate import RUNTIMES

#: Socket paths per runtime, in the order they are tried (relative to the root).
SOCKETS: dict[str, tuple[str, ...]] = {
    "containerd": ("run/containerd/containerd.sock",),
    "crio": ("var/run/crio/crio.sock", "run/crio/crio.sock"),
    "docker": ("var/run/docker.sock", "run/docker.sock"),
}


def _listening(path: Path) -> bool:
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def detect_runtime(root: str | Path = "/", forced: str = "auto") -> str:
    """``docker``, ``containerd``, ``crio`` or ``none``; ``forced`` wins unless ``auto``."""
    if forced != "auto":
        if forced not in (*RUNTIMES, "none"):
            raise InputError(f"container-runtime: {forced!r} must be auto, none, " + ", ".join(RUNTIMES))
        return forced
    base = Path(root)
    for name, paths in SOCKETS.items():
        if any(_listening(base / p) for p in paths):
            return name
    return "none"
