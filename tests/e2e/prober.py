#!/usr/bin/env python3
"""The client side of an end-to-end pod: runs probes concurrently, one thread each.

    ip netns exec NETNS python prober.py

Prints ``{"ready": true}``, then reads JSON lines on stdin::

    {"id": 7, "kind": "tcp", "addr": "10.244.2.11", "port": 80, "timeout": 1.0,
     "src": null, "http": {"method": "GET", "path": "/"}}
    {"id": 8, "kind": "udp", "addr": "10.244.2.11", "port": 81, "timeout": 0.5, "retries": 1}
    {"id": 9, "kind": "icmp", "addr": "198.51.100.12", "icmp_type": 8, "timeout": 1.0}
    {"id": 10, "kind": "kafka", "addr": "10.244.2.10", "port": 9092, "op": "produce",
     "topic": "empire-announce", "client": "kafka-python", "timeout": 1.0}

and answers each with one JSON line, in completion order::

    {"id": 7, "result": "open" | "timeout" | "refused" | "unreachable" | "error",
     "detail": "...", "ms": 3.1, "http_status": 200}

``open`` means the connection was established (TCP), the datagram was echoed
(UDP) or the echo reply came back (ICMP). A policy drop is a ``timeout``;
``refused`` (a RST or a port unreachable) can only come from a kernel with no
server on the port, so the runner treats it as its own bug. ``src`` binds the
source address (the world namespace holds many). Exits on EOF once the probes
in flight are answered. Standard library only, except the ``kafka`` kind: a real
client (`tests.support.kafka_clients`, kafka-python or confluent-kafka) produces
to or consumes (``op``: produce | consume | fetch-raw) the topic, after a TCP
connect shows the broker is reachable at all (else ``timeout``: an L3/L4 drop).
It answers ``open`` with ``kafka_error`` (empty when the operation worked, else
the Kafka error the client surfaced) and ``values`` (records consumed).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import random
import socket
import struct
import sys
import threading
import time

_out_lock = threading.Lock()
_ident_lock = threading.Lock()
_next_ident = [random.randrange(1, 0xFFFF)]


def emit(obj: dict) -> None:
    line = json.dumps(obj) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _classify_oserror(exc: OSError) -> tuple[str, str]:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout", "timed out"
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "refused", str(exc)
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM):
        return "unreachable", str(exc)
    return "error", f"{exc.__class__.__name__}: {exc}"


def probe_tcp(req: dict) -> dict:
    addr, port, timeout = req["addr"], int(req["port"]), float(req.get("timeout", 1.0))
    s = socket.socket(_family(addr), socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            if req.get("src"):
                s.bind((req["src"], 0))
            s.connect((addr, port))
        except OSError as exc:
            result, detail = _classify_oserror(exc)
            return {"result": result, "detail": detail}
        out: dict = {"result": "open", "detail": f"from port {s.getsockname()[1]}"}
        http = req.get("http")
        if http:
            host = f"[{addr}]" if ":" in addr else addr
            lines = [f"{http.get('method', 'GET')} {http.get('path', '/')} HTTP/1.1", f"Host: {host}"]
            lines += [str(h) for h in http.get("headers") or []]
            lines += ["Connection: close", "", ""]
            try:
                s.sendall("\r\n".join(lines).encode())
                data = s.recv(4096)
                status = data.split(b" ", 2)[1] if data.startswith(b"HTTP/") else b""
                out["http_status"] = int(status) if status.isdigit() else None
            except OSError as exc:
                out["http_status"] = None
                out["detail"] += f"; http: {exc.__class__.__name__}"
        return out
    finally:
        s.close()


def probe_udp(req: dict) -> dict:
    addr, port, timeout = req["addr"], int(req["port"]), float(req.get("timeout", 0.5))
    tries = 1 + int(req.get("retries", 1))
    s = socket.socket(_family(addr), socket.SOCK_DGRAM)
    try:
        try:
            if req.get("src"):
                s.bind((req["src"], 0))
            s.connect((addr, port))
        except OSError as exc:
            result, detail = _classify_oserror(exc)
            return {"result": result, "detail": detail}
        token = os.urandom(8).hex().encode()
        for attempt in range(tries):
            try:
                s.send(b"probe " + token)
                deadline = time.monotonic() + timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError()
                    s.settimeout(left)
                    data = s.recv(65535)
                    if data == b"probe " + token:
                        return {"result": "open", "detail": f"echoed (try {attempt + 1})"}
            except OSError as exc:
                result, detail = _classify_oserror(exc)
                if result != "timeout":
                    return {"result": result, "detail": detail}
        return {"result": "timeout", "detail": f"no echo in {tries} tries"}
    finally:
        s.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def probe_icmp(req: dict) -> dict:
    addr, timeout = req["addr"], float(req.get("timeout", 1.0))
    v6 = ":" in addr
    icmp_type = int(req.get("icmp_type", 128 if v6 else 8))
    want = 129 if v6 else 0
    with _ident_lock:
        _next_ident[0] = _next_ident[0] % 0xFFFF + 1
        ident = _next_ident[0]
    payload = os.urandom(16)
    if v6:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        packet = struct.pack("!BBHHH", icmp_type, 0, 0, ident, 1) + payload  # kernel fills the checksum
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        header = struct.pack("!BBHHH", icmp_type, 0, 0, ident, 1)
        packet = struct.pack("!BBHHH", icmp_type, 0, _checksum(header + payload), ident, 1) + payload
    try:
        try:
            if req.get("src"):
                s.bind((req["src"], 0))
            s.sendto(packet, (addr, 0))
        except OSError as exc:
            result, detail = _classify_oserror(exc)
            return {"result": result, "detail": detail}
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"result": "timeout", "detail": f"no echo reply (id {ident})"}
            s.settimeout(left)
            try:
                data, peer = s.recvfrom(65535)
            except OSError as exc:
                result, detail = _classify_oserror(exc)
                return {"result": result, "detail": detail}
            if not v6:
                data = data[(data[0] & 0x0F) * 4:]
            if len(data) < 8 or ipaddress.ip_address(peer[0].split("%")[0]) != ipaddress.ip_address(addr):
                continue
            rtype, _, _, rid, _ = struct.unpack("!BBHHH", data[:8])
            if rtype == want and rid == ident and data[8:] == payload:
                return {"result": "open", "detail": f"echo reply (id {ident})"}
    finally:
        s.close()


def probe_kafka(req: dict) -> dict:
    reach = probe_tcp({"addr": req["addr"], "port": req["port"], "timeout": req.get("timeout", 1.0)})
    if reach["result"] != "open":
        return reach
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from tests.support import kafka_clients as kc

    address = f"{req['addr']}:{req['port']}"
    client, topic, op = req.get("client", "kafka-python"), req["topic"], req["op"]
    if op == "produce":
        got = kc.produce(client, address, topic, str(req.get("value", "probe")).encode())
    elif op == "consume":
        got = kc.consume(client, address, topic, int(req.get("want", 1)), timeout=float(req.get("op_timeout", 8)))
    elif op == "fetch-raw":
        got = kc.raw_fetch(req["addr"], int(req["port"]), topic)
    else:
        raise ValueError(f"op {op!r}: not produce, consume or fetch-raw")
    return {"result": "open", "detail": f"kafka {op} {topic} with {client}: {got.error or 'ok'}",
            "kafka_error": got.error, "values": [v.decode(errors="replace") for v in got.values]}


PROBES = {"tcp": probe_tcp, "udp": probe_udp, "icmp": probe_icmp, "kafka": probe_kafka}


def run(req: dict) -> None:
    start = time.monotonic()
    try:
        out = PROBES[req["kind"]](req)
    except Exception as exc:  # a harness bug: report it as such
        out = {"result": "error", "detail": f"{exc.__class__.__name__}: {exc}"}
    out["id"] = req.get("id")
    out["ms"] = round((time.monotonic() - start) * 1000, 1)
    emit(out)


def main() -> int:
    emit({"ready": True, "pid": os.getpid()})
    threads = []
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        t = threading.Thread(target=run, args=(req,), daemon=True)
        t.start()
        threads.append(t)
        threads = [t for t in threads if t.is_alive()]
    for t in threads:
        t.join(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
