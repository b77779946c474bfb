#!/usr/bin/env python3
"""The server side of an end-to-end pod (or of the test's "world" namespace).

    ip netns exec NETNS python podserver.py --ports 80/TCP,81/UDP [--addrs A,B]

* TCP: accepts on every listed port. A request that starts like HTTP gets
  ``200 Ship landed`` and the connection is closed; anything else is echoed.
* UDP: echoes every datagram back to its sender.
* Without ``--addrs`` each port is one dual-stack wildcard socket; with it, one
  socket per address, so a UDP answer always leaves from the address the
  request was sent to (the world namespace holds many addresses).

Prints one JSON line ``{"ready": true, "listening": [...]}`` once every port is
bound, then reads JSON lines on stdin: ``{"listen": ["82/TCP", ...]}`` binds
more ports and answers ``{"ok": true, "listening": [...]}``. Exits on EOF.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading

HTTP_PREFIXES = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"PATCH ", b"OPTIONS ")
HTTP_BODY = b"Ship landed\n"
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
    + str(len(HTTP_BODY)).encode()
    + b"\r\nConnection: close\r\n\r\n"
    + HTTP_BODY
)


def parse_ports(text: str) -> list[tuple[int, str]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        port, _, proto = item.partition("/")
        proto = (proto or "TCP").upper()
        if proto not in ("TCP", "UDP"):
            raise ValueError(f"{item}: only TCP and UDP are served")
        out.append((int(port), proto))
    return out


def _serve_tcp_conn(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(10)
        try:
            data = conn.recv(65536)
            if data.startswith(HTTP_PREFIXES):
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    more = conn.recv(65536)
                    if not more:
                        break
                    data += more
                conn.sendall(HTTP_RESPONSE)
                return
            while data:
                conn.sendall(data)
                data = conn.recv(65536)
        except OSError:
            return


def _accept_loop(sock: socket.socket) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=_serve_tcp_conn, args=(conn,), daemon=True).start()


def _udp_loop(sock: socket.socket) -> None:
    while True:
        try:
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)
        except OSError:
            if sock.fileno() < 0:
                return


class Server:
    def __init__(self, addrs: list[str]) -> None:
        self.addrs = addrs
        self.listening: set[tuple[int, str]] = set()
        self.sockets: list[socket.socket] = []

    def _bind(self, port: int, proto: str, addr: str | None) -> socket.socket:
        kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
        if addr is None:
            try:
                s = socket.socket(socket.AF_INET6, kind)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                bind_to: tuple[str, int] = ("::", port)
            except OSError:
                s = socket.socket(socket.AF_INET, kind)
                bind_to = ("0.0.0.0", port)
        else:
            s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, kind)
            bind_to = (addr, port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(bind_to)
        except OSError:
            if addr is None and s.family == socket.AF_INET6:
                s.close()
                s = socket.socket(socket.AF_INET, kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", port))
            else:
                raise
        if proto == "TCP":
            s.listen(1024)
            threading.Thread(target=_accept_loop, args=(s,), daemon=True).start()
        else:
            threading.Thread(target=_udp_loop, args=(s,), daemon=True).start()
        return s

    def listen(self, port: int, proto: str) -> None:
        if (port, proto) in self.listening:
            return
        for addr in self.addrs or [None]:
            self.sockets.append(self._bind(port, proto, addr))
        self.listening.add((port, proto))

    def state(self) -> list[str]:
        return [f"{p}/{proto}" for p, proto in sorted(self.listening)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ports", default="", help="PORT/PROTO,... (TCP, UDP)")
    ap.add_argument("--addrs", default="", help="bind these addresses instead of the wildcard")
    args = ap.parse_args(argv)
    server = Server([a for a in args.addrs.split(",") if a])
    for port, proto in parse_ports(args.ports):
        server.listen(port, proto)
    print(json.dumps({"ready": True, "listening": server.state()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            for port, proto in parse_ports(",".join(req.get("listen", []))):
                server.listen(port, proto)
            resp = {"ok": True, "listening": server.state()}
        except Exception as exc:  # report, keep serving
            resp = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}
        print(json.dumps(resp), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
