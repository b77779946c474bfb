"""Blocking client of the agent's unix socket (JSON lines, see `flagella.rpc`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

from flagella import rpc
from flagella.errors import AgentUnavailable

DEFAULT_SOCKET = "/var/run/flagella/flagella.sock"


def socket_path(explicit: str | None) -> str:
    return explicit or os.environ.get("FLAGELLA_SOCKET") or DEFAULT_SOCKET


def _connect(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise AgentUnavailable(f"cannot reach the agent at {path}: {exc.strerror or exc}") from None
    return sock


def call(path: str | None, method: str, params: dict[str, Any] | None = None, timeout: float = 300.0) -> Any:
    sock = _connect(socket_path(path), timeout)
    try:
        sock.sendall(rpc.encode({"method": method, "params": params or {}}))
        with sock.makefile("rb") as f:
            line = f.readline(rpc.MAX_LINE)
    except OSError as exc:
        raise AgentUnavailable(f"agent connection failed: {exc}") from None
    finally:
        sock.close()
    if not line:
        raise AgentUnavailable("the agent closed the connection without answering")
    return rpc.unwrap(rpc.decode(line))


def stream(path: str | None, method: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    sock = _connect(socket_path(path), None)
    try:
        sock.sendall(rpc.encode({"method": method, "params": params or {}}))
        with sock.makefile("rb") as f:
            first = f.readline(rpc.MAX_LINE)
            rpc.unwrap(rpc.decode(first))
            for line in f:
                yield rpc.decode(line)
    finally:
        sock.close()
