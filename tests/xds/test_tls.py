"""The optional TCP listener: TLS only, and it serves the same protocol."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest

from flagella.errors import InputError
from flagella.xds import XdsServer, XdsSettings
from flagella.xds.types import CLUSTER

from .envoy_harness import free_port
from .helpers import Client, cluster, names_of


def test_tcp_without_tls_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="xds.tcp_address: requires tls_cert and tls_key"):
        XdsSettings(unix_socket=tmp_path / "x.sock", tcp_address="127.0.0.1:1")


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_over_tcp(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "flagella-xds")
    port = free_port()

    async def body() -> None:
        settings = XdsSettings(
            unix_socket=tmp_path / "xds.sock", tcp_address=f"127.0.0.1:{port}", tls_cert=cert, tls_key=key
        )
        server = XdsServer(settings)
        await server.start()
        try:
            server.set_resources(CLUSTER, {"c1": cluster("c1")})
            trusted = grpc.aio.secure_channel(
                f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            )
            client = Client("", channel=trusted)
            await client.request(CLUSTER)
            assert names_of(await client.recv()) == ["c1"]
            await client.close()
            plain = Client("", channel=grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
            with pytest.raises(grpc.aio.AioRpcError):  # plaintext client: refused at the handshake
                await plain.request(CLUSTER)
                await plain.recv()
            await plain.close()
        finally:
            await server.stop(0)

    asyncio.run(asyncio.wait_for(body(), 30))


def test_client_certificates_when_a_client_ca_is_set(tmp_path: Path) -> None:
    """With ``tls_client_ca`` only clients with a certificate from that CA get answers."""
    cert, key = self_signed(tmp_path, "flagella-xds")
    envoy_cert, envoy_key = self_signed(tmp_path, "envoy")  # its own CA
    stranger_cert, stranger_key = self_signed(tmp_path, "stranger")
    port = free_port()

    async def body() -> None:
        settings = XdsSettings(
            unix_socket=tmp_path / "xds.sock", tcp_address=f"127.0.0.1:{port}", tls_cert=cert, tls_key=key,
            tls_client_ca=envoy_cert,
        )
        server = XdsServer(settings)
        await server.start()
        try:
            server.set_resources(CLUSTER, {"c1": cluster("c1")})

            def channel(chain: tuple[Path, Path] | None) -> grpc.aio.Channel:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=cert.read_bytes(),
                    private_key=chain[1].read_bytes() if chain else None,
                    certificate_chain=chain[0].read_bytes() if chain else None,
                )
                return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)

            client = Client("envoy", channel=channel((envoy_cert, envoy_key)))
            await client.request(CLUSTER)
            assert names_of(await client.recv()) == ["c1"]
            await client.close()
            for chain in (None, (stranger_cert, stranger_key)):
                other = Client("other", channel=channel(chain))
                with pytest.raises(grpc.aio.AioRpcError):  # refused at the handshake
                    await other.request(CLUSTER)
                    await other.recv()
                await other.close()
        finally:
            await server.stop(0)

    asyncio.run(asyncio.wait_for(body(), 30))
