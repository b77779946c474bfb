"""Blocking client of the agent's unix socket (JSON lines, see `flagella.rpc`): the CLI's
and the CNI plugin's. Standard library only, so the plugin runs on a node's own Python.

The agent may answer before it has read the whole request (a request over its
size limit, or no room for another connection) and then close. Sending then
fails with EPIPE or ECONNRESET, but the answer is already in our receive queue
(unix sockets deliver straight into it), so a failed send is followed by a read:
the user sees the agent's reason, not "Broken pipe".
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from io import BufferedReader
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


def _exchange(sock: socket.socket, f: BufferedReader, request: bytes) -> bytes:
    """Send ``request`` and read the first answer line from ``f`` (also after a refused send)."""
    send_error: OSError | None = None
    try:
        sock.sendall(request)
    except (BrokenPipeError, ConnectionResetError) as exc:
        send_error = exc
    try:
        line = f.readline(rpc.MAX_ANSWER)
    except OSError as exc:
        raise AgentUnavailable(f"agent connection failed: {send_error or exc}") from None
    if not line:
        reason = f": {send_error}" if send_error else ""
        raise AgentUnavailable(f"the agent closed the connection without answering{reason}")
    return line


def call(path: str | None, method: str, params: dict[str, Any] | None = None, timeout: float = 300.0) -> Any:
    sock = _connect(socket_path(path), timeout)
    try:
        with sock.makefile("rb") as f:
            line = _exchange(sock, f, rpc.encode({"method": method, "params": params or {}}))
    except OSError as exc:
        raise AgentUnavailable(f"agent connection failed: {exc}") from None
    finally:
        sock.close()
    return rpc.unwrap(rpc.decode(line))


def stream(path: str | None, method: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    sock = _connect(socket_path(path), None)
    try:
        with sock.makefile("rb") as f:
            first = _exchange(sock, f, rpc.encode({"method": method, "params": params or {}}))
            rpc.unwrap(rpc.decode(first))
            for line in f:
                yield rpc.decode(line)
    finally:
        sock.close()
