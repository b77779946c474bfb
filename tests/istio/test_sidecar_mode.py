"""Sidecar detection and what the kernel keeps for a pod with an Istio sidecar.

The agent runs over the in-memory datapath twin here; the kernel side of
the same entries is the real datapath's (tests/system)."""

from __future__ import annotations

import pytest
import yaml

from flagella.agent.core import AgentCore
from flagella.agent.settings import AgentSettings
from flagella.datapath.port import MemoryDatapath
from flagella.endpoint import Endpoint
from flagella.errors import InputError
from flagella.istio.sidecar import SIDECAR_LABEL_KEY, detect_sidecar, is_sidecar
from flagella.policy.mapstate import Verdict

POD = {
    "metadata": {"annotations": {"sidecar.istio.io/status": "{}"}, "labels": {"app": "leia"}},
    "spec": {"containers": [
        {"name": "leia"},
        {"name": "istio-proxy", "volumeMounts": [{"name": "flagella-sock", "mountPath": "/var/run/flagella/"}]},
    ]},
}


def test_detect_sidecar_like_cilium() -> None:
    assert detect_sidecar(POD) == "true"
    not_injected = {**POD, "metadata": {"labels": {}}}
    assert detect_sidecar(not_injected) == "false"
    no_mount = {**POD, "spec": {"containers": [{"name": "istio-proxy", "volumeMounts": [{"mountPath": "/etc/istio"}]}]}}
    assert detect_sidecar(no_mount) == "false"
    other_container = {**POD, "spec": {"containers": [{"name": "app", "volumeMounts": [{"mountPath": "/var/run/flagella"}]}]}}
    assert detect_sidecar(other_container) == "false"
    forced = {**POD, "metadata": {**POD["metadata"], "labels": {SIDECAR_LABEL_KEY: "false"}}}
    assert detect_sidecar(forced) is None  # the user's label wins
    assert detect_sidecar({}) == "false"


POLICY = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: leia, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: leia}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: luke}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
  - fromEndpoints: [{matchLabels: {app: luke}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
""")


def test_sidecar_pod_gets_no_http_redirect_but_keeps_l3l4(tmp_path) -> None:
    dp = MemoryDatapath()
    core = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    core.restore()
    try:
        luke = core.create_endpoint("luke", labels={"app": "luke"})
        plain = core.create_endpoint("leia-plain", labels={"app": "leia"})
        mesh = core.create_endpoint("leia-mesh", labels={"app": "leia"}, istio_sidecar=True)
        assert core.wait_for_revision(core.import_policies([POLICY]), timeout=30) == []
        assert mesh.identity != plain.identity  # the label is part of the identity
        assert is_sidecar(mesh.identity_labels()) and not is_sidecar(plain.identity_labels())

        def ingress(ep_id: int) -> dict[tuple[int, int, int], Verdict]:
            return {(k.identity, k.protocol, k.port): Verdict(v.verdict)
                    for k, v in dp.policy.items() if k.ep_id == ep_id and not k.egress}

        host = {(1, 0, 0): Verdict.ALLOW}  # allow_localhost (kubelet probes)
        assert ingress(plain.id) == {(luke.identity, 6, 80): Verdict.REDIRECT, (luke.identity, 17, 53): Verdict.ALLOW,
                                     **host}
        # Same peers and ports, the HTTP port allowed (the sidecar filters requests after mTLS).
        assert ingress(mesh.id) == {(luke.identity, 6, 80): Verdict.ALLOW, (luke.identity, 17, 53): Verdict.ALLOW,
                                    **host}
        # The sidecar's own config still comes from the resolved (redirecting) policy.
        assert core.engine.policy(mesh.id).ingress.lookup(luke.identity, 6, 80).verdict == Verdict.REDIRECT
        # A pod cannot claim the label through its own labels (it is agent-owned).
        with pytest.raises(InputError, match=SIDECAR_LABEL_KEY):
            core.create_endpoint("sneaky", labels={"app": "leia", SIDECAR_LABEL_KEY: "true"})
        # The persisted endpoint record carries the flag (restore reads it back).
        assert Endpoint.from_json(core.find("leia-mesh").to_json()).istio_sidecar
    finally:
        core.close()
