"""A test double of the Kubernetes API server: fixtures over real HTTP.

No kube-apiserver binary can be had here. This serves the JSON of
tests/k8s/fixtures for GET list and GET ?watch=true (a chunked stream of
events, one per line), and records PATCH requests to ``/status`` subresources.
Per path, `script` holds the watch responses still to give, in order: a list of
events, or ``"gone"`` (an HTTP 200 stream with one ERROR 410 event, as the real
server answers a compacted resourceVersion); when the script is empty a watch
answers an empty stream. `lists` may be replaced between steps (a relist sees
the new body).

For a live cluster (an agent watching it), `apply` and `remove` change one
object: the list a relist gets and the watch event of the next watch request
both follow, with one resourceVersion counter across kinds, as etcd's.
``FakeApiServer(fixtures=False)`` starts with every list empty.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

FIXTURES = Path(__file__).parent / "fixtures"

PATHS = {
    "/api/v1/pods": "pods",
    "/api/v1/namespaces": "namespaces",
    "/api/v1/nodes": "nodes",
    "/apis/networking.k8s.io/v1/networkpolicies": "networkpolicies",
    "/apis/cilium.io/v2/ciliumnetworkpolicies": "ciliumnetworkpolicies",
    "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies": "ciliumclusterwidenetworkpolicies",
}


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def events(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


class FakeApiServer:
    def __init__(self, fixtures: bool = True) -> None:
        self.lists: dict[str, Any] = {
            p: fixture(f"{n}.json") if fixtures else {"kind": "List", "metadata": {"resourceVersion": "1"}, "items": []}
            for p, n in PATHS.items()
        }
        self.resource_version = 1000
        self.script: dict[str, list[Any]] = {p: [] for p in PATHS}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.patches: list[tuple[str, str, Any]] = []  # (path, content type, body)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                q = parse_qs(url.query)
                with server._lock:
                    server.requests.append(("GET", url.path, q))
                    if url.path not in PATHS:
                        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404, "message": "not found"}
                        return self._send(404, json.dumps(body).encode())
                    if q.get("watch") != ["true"]:
                        return self._send(200, json.dumps(server.lists[url.path]).encode())
                    step = server.script[url.path].pop(0) if server.script[url.path] else []
                if step == "gone":
                    step = [fixture("watch-gone.json")]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for ev in step:
                    line = (json.dumps(ev) + "\n").encode()
                    self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

            def do_PATCH(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(n))
                with server._lock:
                    server.patches.append((self.path, self.headers.get("Content-Type", ""), body))
                self._send(200, json.dumps({"kind": "CiliumNetworkPolicy"}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def apply(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace ``obj`` (by namespace/name) as the server would; answer it."""
        return self._change(path, obj, remove=False)

    def remove(self, path: str, obj: dict[str, Any]) -> None:
        self._change(path, obj, remove=True)

    def gone(self, path: str) -> None:
        """The next watch of ``path`` answers 410 Gone (its resourceVersion was compacted)."""
        with self._lock:
            self.script[path].append("gone")

    def _change(self, path: str, obj: dict[str, Any], *, remove: bool) -> dict[str, Any]:
        with self._lock:
            self.resource_version += 1
            rv = str(self.resource_version)
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = rv
            key = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
            body = self.lists[path]
            items = [o for o in body["items"] if (o["metadata"].get("namespace"), o["metadata"]["name"]) != key]
            existed = len(items) != len(body["items"])
            if not remove:
                items.append(obj)
            body["items"] = items
            body["metadata"]["resourceVersion"] = rv
            kind = "DELETED" if remove else "MODIFIED" if existed else "ADDED"
            self.script[path].append([{"type": kind, "object": obj}])
            return obj

    def status_patches(self, name: str) -> list[dict[str, Any]]:
        """The bodies of the PATCHes of object ``name``'s status, in order."""
        with self._lock:
            return [b for p, _, b in self.patches if p.endswith(f"/{name}/status")]

    def watches(self, path: str) -> list[dict[str, list[str]]]:
        return [q for m, p, q in self.requests if p == path and q.get("watch") == ["true"]]
