"""A real Envoy shaped like an Istio sidecar's inbound side, fed by Flagella's ECDS.

- Certificates: a mesh CA and one leaf per service account, each with only a
  SPIFFE URI SAN (``spiffe://cluster.local/ns/<ns>/sa/<sa>``), made with the
  ``openssl`` CLI, as istiod's CA issues them.
- The listener is Istio's ``virtualInbound`` (spec 3.4): ``tls_inspector``,
  a STRICT mTLS chain matched on transport ``tls`` and Istio's ALPNs, the
  client certificate required, an inline route ``inbound|<port>||``, and the
  HTTP filters Istio puts there: its own ``envoy.filters.http.rbac`` (empty:
  no AuthorizationPolicy), then ours as the EnvoyFilter inserts it, after
  Istio's authz (``config_discovery`` over ``google_grpc`` to the agent's
  unix socket, ``default_config`` deny-all), then the router.
- Clients speak HTTP/1.1 over mTLS with ALPN ``istio-http/1.1`` from a
  loopback source address of their own (the pod IP the ipcache knows).
"""

from __future__ import annotations

import http.client
import ipaddress
import itertools
import os
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import yaml

from flagella.istio.workload import node_id
from flagella.proxy.envoy import EnvoyProcess, bootstrap, free_port
from flagella.proxy.rbac import RBAC_TYPE_URL

TRUST_DOMAIN = "cluster.local"
ISTIO_ALPNS = ["istio-http/1.0", "istio-http/1.1", "istio-h2"]
_base_ids = itertools.count(52000 + os.getpid() % 1000 * 10)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(directory: Path) -> Path:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/O=cluster.local", cwd=directory)
    return directory / "ca.pem"


def make_leaf(directory: Path, namespace: str, sa: str) -> tuple[Path, Path]:
    """A workload certificate whose only SAN is its SPIFFE id (as istiod issues them)."""
    name = f"{namespace}-{sa}"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/O=", cwd=directory)
    (directory / f"{name}.ext").write_text(
        f"subjectAltName=critical,URI:spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}\n"
        "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


ENVOYFILTER = Path(__file__).resolve().parents[2] / "manifests" / "istio" / "envoyfilter.yaml"
MANIFEST_SOCKET = "unix:///var/run/flagella/xds.sock"


def _flagella_filter(xds_socket: Path) -> dict[str, Any]:
    """The HTTP filter exactly as manifests/istio/envoyfilter.yaml inserts it, with the test's socket."""
    (doc,) = [d for d in yaml.safe_load_all(ENVOYFILTER.read_text()) if d]
    value: dict[str, Any] = doc["spec"]["configPatches"][0]["patch"]["value"]
    (service,) = value["config_discovery"]["config_source"]["api_config_source"]["grpc_services"]
    assert service["google_grpc"]["target_uri"] == MANIFEST_SOCKET
    service["google_grpc"]["target_uri"] = f"unix://{xds_socket}"
    return value


KAFKA_ENVOYFILTER = ENVOYFILTER.with_name("envoyfilter-kafka.yaml")
ISTIO_TCP_ALPNS = ["istio-peer-exchange", "istio"]


def _kafka_filters(xds_socket: Path, port: int) -> list[dict[str, Any]]:
    """The network filters manifests/istio/envoyfilter-kafka.yaml inserts, for ``port``, with the test's socket."""
    text = KAFKA_ENVOYFILTER.read_text().replace("9092", str(port))
    (doc,) = [d for d in yaml.safe_load_all(text) if d]
    out = []
    for patch in doc["spec"]["configPatches"]:
        value: dict[str, Any] = patch["patch"]["value"]
        (service,) = value["config_discovery"]["config_source"]["api_config_source"]["grpc_services"]
        assert service["google_grpc"]["target_uri"] == MANIFEST_SOCKET
        service["google_grpc"]["target_uri"] = f"unix://{xds_socket}"
        out.append(value)
    return out


def kafka_sidecar_config(
    pod: str, namespace: str, pod_ip: str, port: int, app_port: int, cert: tuple[Path, Path], ca: Path,
    xds_socket: Path,
) -> dict[str, Any]:
    """A sidecar whose inbound TCP chain on ``port`` (mTLS, ALPN ``istio``) runs the Kafka
    EnvoyFilter's filters before Istio's ``tcp_proxy`` to the app."""
    config = sidecar_config(pod, namespace, pod_ip, port, app_port, cert, ca, xds_socket)
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    chain["filter_chain_match"]["application_protocols"] = ISTIO_TCP_ALPNS
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    tls["alpn_protocols"] = ["istio"]
    cluster_name = f"inbound|{port}||"
    tcp_proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                         "stat_prefix": cluster_name, "cluster": cluster_name},
    }
    chain["filters"] = [*_kafka_filters(xds_socket, port), tcp_proxy]
    return config


def sidecar_config(
    pod: str, namespace: str, pod_ip: str, port: int, app_port: int, cert: tuple[Path, Path], ca: Path,
    xds_socket: Path, flagella: bool = True,
) -> dict[str, Any]:
    """Bootstrap of an Envoy that stands for ``pod``'s istio-proxy (inbound only)."""
    filters: list[dict[str, Any]] = [
        {  # Istio's own authorization filter, with no AuthorizationPolicy: allows all.
            "name": "envoy.filters.http.rbac",
            "typed_config": {"@type": RBAC_TYPE_URL},
        },
    ]
    if flagella:
        filters.append(_flagella_filter(xds_socket))
    filters.append({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
    cluster_name = f"inbound|{port}||"
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": f"inbound_0.0.0.0_{port}",
        "route_config": {
            "name": cluster_name,
            "virtual_hosts": [{
                "name": "inbound|http|80", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster_name}}],
            }],
        },
        "http_filters": filters,
    }
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [{"certificate_chain": {"filename": str(cert[0])},
                                  "private_key": {"filename": str(cert[1])}}],
            "validation_context": {
                "trusted_ca": {"filename": str(ca)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TRUST_DOMAIN}/"}}
                ],
            },
        },
    }
    listener = {
        "name": "virtualInbound",
        "address": {"socket_address": {"address": pod_ip, "port_value": port}},
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
        }],
        "filter_chains": [{
            "name": f"0.0.0.0_{port}",
            "filter_chain_match": {"destination_port": port, "transport_protocol": "tls",
                                   "application_protocols": ISTIO_ALPNS},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
        }],
    }
    app = {
        "name": cluster_name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": cluster_name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": app_port}}}}]}]},
    }
    config = bootstrap(
        node_id(pod, namespace, ipaddress.ip_address(pod_ip)), xds_socket, free_port(),
        static_resources={"listeners": [listener], "clusters": [app]}, ads=False,
    )
    config["static_resources"]["clusters"] = [app]  # no envoy_grpc cluster: google_grpc only, as in Istio
    config["node"]["metadata"] = {"NAMESPACE": namespace, "NAME": pod, "INSTANCE_IPS": pod_ip}
    return config


def start_sidecar(config: dict[str, Any]) -> EnvoyProcess:
    envoy = EnvoyProcess(config, base_id=next(_base_ids))
    envoy.start()
    return envoy


def tls_connection(
    pod_ip: str, port: int, source: str, cert: tuple[Path, Path], ca: Path, alpn: str = "istio",
) -> ssl.SSLSocket:
    """An mTLS connection as a peer sidecar opens it for TCP (ALPN ``istio``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert[0], cert[1])
    ctx.set_alpn_protocols([alpn])
    raw = socket.create_connection((pod_ip, port), timeout=5, source_address=(source, 0))
    return ctx.wrap_socket(raw)


def request(
    pod_ip: str, port: int, path: str, source: str, cert: tuple[Path, Path], ca: Path, method: str = "GET",
) -> int:
    """One HTTP/1.1 request over mTLS, as a peer sidecar sends it; returns the status."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # Istio checks the SPIFFE SAN, not a host name
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert[0], cert[1])
    ctx.set_alpn_protocols(["istio-http/1.1"])
    conn = http.client.HTTPSConnection(pod_ip, port, context=ctx, source_address=(source, 0), timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()
