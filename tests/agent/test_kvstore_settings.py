"""The ``kvstore`` settings group selects where identities live."""

from __future__ import annotations

from pathlib import Path

import pytest

from flagella.agent.settings import KvstoreSettings, build_identity_backend, load_settings
from flagella.errors import InputError
from flagella.identity import EtcdBackend
from tests.support.etcd import EtcdServer


def test_default_is_local_sqlite() -> None:
    settings = load_settings(None)
    assert settings.kvstore.backend == "local"
    assert build_identity_backend(settings.kvstore) is None


def test_etcd_settings_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "kvstore: {backend: etcd, endpoints: ['http://127.0.0.1:2379'], lease_ttl_s: 30, node: n1}\n"
    )
    kv = load_settings(path).kvstore
    assert kv == KvstoreSettings(
        backend="etcd", endpoints=("http://127.0.0.1:2379",), lease_ttl_s=30, node="n1"
    )


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("kvstore: {backend: consul}", "kvstore.backend"),
        ("kvstore: {backend: etcd}", "kvstore.endpoints"),
        ("kvstore: {endpoints: ['127.0.0.1:2379']}", r"kvstore.endpoints\[0\]"),
        ("kvstore: {endpoints: ['http://h:x']}", r"kvstore.endpoints\[0\]"),
        ("kvstore: {lease_ttl_s: 1}", "kvstore.lease_ttl_s"),
        ("kvstore: {timeout_s: 0}", "kvstore.timeout_s"),
        ("kvstore: {node: a/b}", "kvstore.node"),
        ("kvstore: {endpoint: x}", "kvstore.endpoint"),
    ],
)
def test_bad_kvstore_settings_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text + "\n")
    with pytest.raises(InputError, match=field):
        load_settings(path)


def test_etcd_backend_is_built_and_works() -> None:
    server = EtcdServer()
    try:
        server.start()
        backend = build_identity_backend(
            KvstoreSettings(backend="etcd", endpoints=(server.endpoint,), node="n1")
        )
        assert isinstance(backend, EtcdBackend)
        try:
            ident = backend.acquire("k8s:app=web", 256)
            assert backend.lookup("k8s:app=web") == ident
        finally:
            backend.close()
    finally:
        server.close()
