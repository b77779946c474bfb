"""Proxy ports and redirect settings: bad input is refused with the field's name, and the
local-ingress RBAC composition is checked in the real Envoy by tests/system/test_proxy_redirect.py."""

from __future__ import annotations

import ipaddress

import pytest
from envoy.config.rbac.v3 import rbac_pb2

from flagella.agent.settings import load_settings
from flagella.datapath.maps import DatapathConfig
from flagella.errors import DatapathError, InputError
from flagella.policy.api import HTTPRule
from flagella.policy.mapstate import L7Policy
from flagella.proxy.ports import ProxySettings
from flagella.proxy.rbac import PeerSet, http_rbac, local_ingress_rbac


def test_ports_per_direction() -> None:
    s = ProxySettings()
    assert (s.port(egress=False), s.port(egress=True)) == (15001, 15002)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"ingress_port": 0}, "proxy.ingress_port"),
        ({"egress_port": 70000}, "proxy.egress_port"),
        ({"ingress_port": 15005, "egress_port": 15005}, "proxy.egress_port"),
        ({"reentry_ifname": "x" * 16}, "proxy.reentry_ifname"),
        ({"reentry_peer": "a/b"}, "proxy.reentry_peer"),
        ({"nft_table": "t; flush ruleset"}, "proxy.nft_table"),
    ],
)
def test_bad_proxy_settings_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        ProxySettings(**kw).validate()  # type: ignore[arg-type]


def test_agent_settings_carry_the_proxy_group(tmp_path: object) -> None:
    import pathlib

    p = pathlib.Path(str(tmp_path)) / "s.yaml"
    p.write_text("proxy: {enabled: true, ingress_port: 16001, egress_port: 16002}\n")
    s = load_settings(p)
    assert s.proxy.enabled and s.proxy.port(egress=True) == 16002
    p.write_text("proxy: {ingres_port: 1}\n")
    with pytest.raises(InputError, match=r"proxy\.ingres_port: unknown setting"):
        load_settings(p)
    p.write_text("proxy: {egress_port: 15001}\n")
    with pytest.raises(InputError, match=r"proxy\.egress_port"):
        load_settings(p)


def test_reentry_mac_must_be_six_bytes() -> None:
    with pytest.raises(DatapathError, match="reentry_mac"):
        DatapathConfig(reentry_mac=b"\x01\x02")


def test_local_ingress_rbac_scopes_policies_to_their_destination() -> None:
    server = ipaddress.ip_network("10.244.0.5/32")
    client = ipaddress.ip_network("10.244.0.6/32")
    rbac = http_rbac([(300, L7Policy("http", frozenset({HTTPRule(path="/ok")})))],
                     {300: PeerSet((client,))}, egress=False, matcher_threshold=1 << 30)
    out = local_ingress_rbac([([server], rbac)]).rules
    assert out.action == rbac_pb2.RBAC.ALLOW
    scoped = out.policies["dst0-id-300"]
    to_it, wanted = scoped.permissions[0].and_rules.rules
    assert to_it.or_rules.rules[0].destination_ip.address_prefix == "10.244.0.5"
    assert list(wanted.or_rules.rules) == list(rbac.rules.policies["id-300"].permissions)
    assert list(scoped.principals) == list(rbac.rules.policies["id-300"].principals)
    elsewhere = out.policies["not-local-l7"].permissions[0]
    assert elsewhere.not_rule.or_rules.rules[0].destination_ip.address_prefix == "10.244.0.5"


def test_local_ingress_rbac_fails_closed_for_the_matcher_form() -> None:
    """A target whose rules cannot be scoped gets no policy: requests to it are denied."""
    server = ipaddress.ip_network("10.244.0.5/32")
    rbac = http_rbac([(300, L7Policy("http", frozenset({HTTPRule(path="/ok")})))],
                     {300: PeerSet((ipaddress.ip_network("10.244.0.6/32"),))}, egress=False, matcher_threshold=0)
    assert not rbac.HasField("rules")
    out = local_ingress_rbac([([server], rbac)]).rules
    assert set(out.policies) == {"not-local-l7"}
