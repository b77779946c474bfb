"""Sidecar detection and what the kernel keeps for a pod with an Istio sidecar.

The agent runs over the in-memory datapath twin here; the kernel side of
the same entries is the real datapath's (tests/system)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from flagella.agent.core import AgentCore
from flagella.agent.settings import AgentSettings
from flagella.datapath.port import MemoryDatapath
from flagella.endpoint import Endpoint
from flagella.errors import InputError
from flagella.istio.sidecar import SIDECAR_LABEL_KEY, has_flagella_sidecar, is_sidecar
from flagella.k8s.translate import pod_info
from flagella.policy.mapstate import Verdict

SOCKET_IN_POD = "/var/run/flagella/xds.sock"
HOST_SOCKET = "/var/run/flagella/envoy/sockets/xds.sock"


def pod(*containers: dict[str, Any], annotated: bool = True, labels: dict[str, str] | None = None,
        volumes: Any = None, native: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"initContainers" if native else "containers": list(containers)}
    if volumes is not None:
        spec["volumes"] = volumes
    meta: dict[str, Any] = {"name": "leia", "namespace": "default", "labels": labels or {"app": "leia"}}
    if annotated:
        meta["annotations"] = {"sidecar.istio.io/status": "{}"}
    return {"metadata": meta, "spec": spec, "status": {}}


PROXY = {"name": "istio-proxy", "volumeMounts": [{"name": "flagella-sock", "mountPath": "/var/run/flagella/"}]}
HOST_DIR = [{"name": "flagella-sock", "hostPath": {"path": "/var/run/flagella/envoy/sockets"}}]


def sidecar(obj: dict[str, Any]) -> bool:
    return has_flagella_sidecar(pod_info(obj).istio_proxy_mounts, SOCKET_IN_POD, HOST_SOCKET)


def test_a_sidecar_is_the_injected_proxy_mounting_the_agents_socket_dir() -> None:
    assert sidecar(pod(PROXY, volumes=HOST_DIR))
    assert sidecar(pod(PROXY, volumes=HOST_DIR, native=True))  # Kubernetes native sidecar
    assert not sidecar(pod(PROXY, volumes=HOST_DIR, annotated=False))  # not injected
    assert not sidecar(pod(PROXY, volumes=[{"name": "flagella-sock", "emptyDir": {}}]))
    assert not sidecar(pod(PROXY, volumes=[{"name": "flagella-sock", "hostPath": {"path": "/var/run"}}]))
    assert not sidecar(pod({**PROXY, "name": "app"}, volumes=HOST_DIR))  # another container
    assert not sidecar(pod({"name": "istio-proxy", "volumeMounts": [
        {"name": "flagella-sock", "mountPath": "/etc/istio"}]}, volumes=HOST_DIR))
    # subPath: the directory below the hostPath is what the container sees.
    state_dir = [{"name": "flagella-sock", "hostPath": {"path": "/var/run/flagella"}}]
    def sub(**extra: str) -> dict[str, Any]:
        return {"name": "istio-proxy", "volumeMounts": [{**PROXY["volumeMounts"][0], **extra}]}  # type: ignore[index]
    assert sidecar(pod(sub(subPath="envoy/sockets"), volumes=state_dir))
    assert not sidecar(pod(PROXY, volumes=state_dir))  # the state dir itself: not the socket's
    assert not sidecar(pod(sub(subPath="x"), volumes=HOST_DIR))
    assert not sidecar(pod(sub(subPath="../envoy/sockets"), volumes=state_dir))
    assert not sidecar(pod(sub(subPathExpr="$(POD)"), volumes=HOST_DIR))


def test_the_pods_own_label_does_not_make_it_a_sidecar() -> None:
    """Cilium 1.1 let the pod's label win; here it is agent-owned and dropped, so a pod
    cannot switch off the node proxy's ingress L7 enforcement for itself."""
    labelled = pod({"name": "app"}, labels={"app": "leia", SIDECAR_LABEL_KEY: "true"})
    assert not sidecar(labelled)
    assert SIDECAR_LABEL_KEY not in pod_info(labelled).labels


@settings(max_examples=200, deadline=None)
@given(volumes=st.recursive(st.none() | st.integers() | st.text(max_size=5),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                st.sampled_from(["name", "hostPath", "path", "emptyDir"]), inner, max_size=3)),
       mounts=st.lists(st.dictionaries(st.sampled_from(["name", "mountPath"]),
                                       st.none() | st.integers() | st.text(max_size=20), max_size=2), max_size=3))
def test_malformed_volumes_and_mounts_are_no_sidecar_and_no_error(volumes: Any, mounts: Any) -> None:
    """What a pod's author controls, however shaped, never raises and never flags by accident."""
    obj = pod({"name": "istio-proxy", "volumeMounts": mounts}, volumes=volumes)
    assert sidecar(obj) is False


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
