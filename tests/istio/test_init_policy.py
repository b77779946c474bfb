"""The init policy, resolved by the real engine for a ``reserved:init`` endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flagella.errors import InputError
from flagella.istio.initpolicy import InitPolicySettings, init_policy
from flagella.policy.api import parse_policy
from flagella.policy.engine import PolicyEngine
from flagella.policy.identities import reserved_identity_labels
from flagella.policy.labels import k8s_labels
from flagella.policy.mapstate import Verdict
from flagella.policy.resolver import EndpointInfo, PolicySettings

MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "istio" / "init-policy.yaml"
INIT, HOST, WORLD = 5, 1, 2
UDP, TCP = 17, 6


def test_manifest_is_the_default_output() -> None:
    assert yaml.safe_load(MANIFEST.read_text()) == init_policy(InitPolicySettings())


@pytest.mark.parametrize("settings", [InitPolicySettings(), InitPolicySettings(dns_ports=(53, 5353), namespaces=("mesh", "istio-system"))])
def test_init_endpoint_reaches_dns_and_control_plane_only(settings: InitPolicySettings) -> None:
    engine = PolicyEngine(PolicySettings())
    engine.upsert_policies([parse_policy(init_policy(settings))])
    for ident, labels in reserved_identity_labels().items():
        engine.set_identity(ident, labels)
    istiod, other = 600, 601
    engine.set_identity(istiod, k8s_labels({"app": "istiod"}, settings.namespaces[-1]))
    engine.set_identity(other, k8s_labels({"app": "db"}, "default"))
    engine.upsert_endpoint(EndpointInfo(9, INIT, reserved_identity_labels()[INIT]))
    egress, ingress = engine.policy(9).egress, engine.policy(9).ingress
    for port in settings.dns_ports:
        assert egress.lookup(WORLD, UDP, port).verdict == Verdict.ALLOW
        assert egress.lookup(other, UDP, port).verdict == Verdict.ALLOW
        assert egress.lookup(WORLD, TCP, port).verdict == Verdict.DENY
    assert egress.lookup(istiod, TCP, 15012).verdict == Verdict.ALLOW
    assert egress.lookup(other, TCP, 5432).verdict == Verdict.DENY
    assert egress.lookup(WORLD, TCP, 443).verdict == Verdict.DENY
    assert ingress.lookup(HOST, TCP, 15021).verdict == Verdict.ALLOW
    assert ingress.lookup(other, TCP, 80).verdict == Verdict.DENY


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(InputError, match="istio.init_policy.dns_ports"):
        InitPolicySettings(dns_ports=(0,))
    with pytest.raises(InputError, match="istio.init_policy"):
        InitPolicySettings(dns_ports=(), namespaces=())
