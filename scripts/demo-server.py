"""The deathstar's HTTP API of the Star Wars demo (runs inside the pod's netns)."""

import http.server
import socketserver
import sys


class Deathstar(http.server.BaseHTTPRequestHandler):
    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        if self.path == "/v1/request-landing":
            self._answer(b"Ship landed\n")
        else:
            self._answer(b"Not found\n")

    def do_PUT(self) -> None:  # noqa: N802
        self._answer(b"Panic: deathstar exploded\n")

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    socketserver.ThreadingTCPServer(("0.0.0.0", port), Deathstar).serve_forever()
