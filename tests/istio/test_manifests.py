"""``manifests/istio/`` against the Istio CRD schemas and Envoy's own protos.

The CRDs' openAPIV3Schema is checked by a small structural validator
(jsonschema is not in the venv): types, enums, required fields, and
unknown fields, which the API server would silently prune. The patch
value, ConfigMap bootstrap and annotations are parsed as what Envoy and the
injector read. The sidecar test (test_sidecar_envoy) runs the EnvoyFilter's
filter itself in a real Envoy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as _hpo  # noqa: F401 (descriptor)
from google.protobuf import json_format

from flagella.istio.sidecar import has_flagella_sidecar
from flagella.istio.workload import FILTER_NAME, IstioSettings
from flagella.k8s.translate import pod_info
from flagella.policy.api import load_policies
from flagella.proxy import listeners as _listeners  # noqa: F401 (registers the RBAC descriptors)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests" / "istio"
SCHEMAS = ROOT / ".." / "shared" / "schemas" / "istio"


def _schema(crd: str, version: str) -> dict[str, Any]:
    doc = yaml.safe_load((SCHEMAS / crd).read_text())
    for v in doc["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]
    raise AssertionError(f"{crd} has no version {version}")


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Structural-schema errors of ``value``, each naming its path."""
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return []
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, int | str) else [f"{path}: not int-or-string"]
    errors = []
    kind = schema.get("type")
    if kind and not isinstance(value, _TYPES[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                errors.append(f"{path}.{req}: required")
        for key, sub in value.items():
            if key in props:
                errors += validate(sub, props[key], f"{path}.{key}")
            elif "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
                errors += validate(sub, schema["additionalProperties"], f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{key}: unknown field")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def validate_resource(doc: dict[str, Any], crd: str) -> list[str]:
    """apiVersion and kind against the CRD, ``spec`` against its schema (metadata is the API server's)."""
    spec = yaml.safe_load((SCHEMAS / crd).read_text())["spec"]
    group, _, version = doc.get("apiVersion", "").partition("/")
    errors = []
    if group != spec["group"] or doc.get("kind") != spec["names"]["kind"]:
        errors.append(f".apiVersion/.kind: {doc.get('apiVersion')} {doc.get('kind')} is not this CRD")
    if not any(v["name"] == version and v.get("served", True) for v in spec["versions"]):
        return [*errors, f".apiVersion: version {version!r} not served"]
    schema = _schema(crd, version)
    extra = set(doc) - {"apiVersion", "kind", "metadata", *schema.get("properties", {})}
    errors += [f".{k}: unknown field" for k in sorted(extra)]
    return errors + validate(doc.get("spec", {}), schema["properties"]["spec"], ".spec")


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def test_validator_rejects_what_the_api_server_would() -> None:
    schema = _schema("envoyfilter-crd.yaml", "v1alpha3")
    (good,) = _docs("envoyfilter.yaml")
    assert validate_resource(good, "envoyfilter-crd.yaml") == []
    bad = json.loads(json.dumps(good))
    bad["spec"]["configPatches"][0]["applyTo"] = "HTTP_FILTERS"
    bad["spec"]["configPatches"][0]["match"]["context"] = "INBOUND"
    bad["spec"]["configPatches"][0]["match"]["listener"]["filterChain"]["filtr"] = {}
    bad["spec"]["priority"] = "10"
    bad["apiVersion"] = "networking.istio.io/v1beta1"
    assert validate_resource(bad, "envoyfilter-crd.yaml") == [".apiVersion: version 'v1beta1' not served"]
    errors = validate(bad["spec"], schema["properties"]["spec"], ".spec")
    assert any(e.startswith(".spec.configPatches[0].applyTo:") for e in errors)
    assert any(e.startswith(".spec.configPatches[0].match.context:") for e in errors)
    assert ".spec.configPatches[0].match.listener.filterChain.filtr: unknown field" in errors
    assert any(e.startswith(".spec.priority: expected integer") for e in errors)


@pytest.mark.parametrize("name", ["envoyfilter.yaml", "envoyfilter-bootstrap-variant.yaml"])
def test_envoyfilters_match_the_crd_and_envoy(name: str) -> None:
    (doc,) = _docs(name)
    assert doc["apiVersion"] == "networking.istio.io/v1alpha3" and doc["kind"] == "EnvoyFilter"
    assert validate_resource(doc, "envoyfilter-crd.yaml") == []
    (patch,) = doc["spec"]["configPatches"]
    assert patch["match"]["context"] == "SIDECAR_INBOUND"
    assert (patch["applyTo"], patch["patch"]["operation"]) == ("HTTP_FILTER", "INSERT_BEFORE")
    filt = json_format.ParseDict(patch["patch"]["value"], hcm_pb2.HttpFilter())
    assert filt.name == FILTER_NAME  # the ECDS resource name the agent publishes
    discovery = filt.config_discovery
    assert discovery.default_config.type_url == "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
    assert list(discovery.type_urls) == [discovery.default_config.type_url]
    (service,) = discovery.config_source.api_config_source.grpc_services
    if name == "envoyfilter.yaml":
        assert service.google_grpc.target_uri == "unix:///var/run/flagella/xds.sock"
    else:
        assert service.envoy_grpc.cluster_name == "flagella-xds"


def test_bootstrap_override_is_a_bootstrap_with_the_static_cluster() -> None:
    (cm,) = _docs("bootstrap-override.yaml")
    boot = json_format.ParseDict(json.loads(cm["data"]["custom_bootstrap.json"]), bootstrap_pb2.Bootstrap())
    (cluster,) = boot.static_resources.clusters
    assert cluster.name == "flagella-xds"
    pipe = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe
    assert pipe.path == "/var/run/flagella/xds.sock"


def test_pod_annotations_mount_the_xds_socket_dir_and_nothing_more() -> None:
    """The pods mount the host directory of the agent's xDS socket (the DaemonSet's
    ConfigMap), not the state dir with the agent's API socket, at the directory the
    sidecar config (``socket_in_pod``) names; the agent recognizes exactly that mount."""
    (deploy,) = _docs("pod-annotations.yaml")
    ann = deploy["spec"]["template"]["metadata"]["annotations"]
    volumes = json.loads(ann["sidecar.istio.io/userVolume"])
    mounts = json.loads(ann["sidecar.istio.io/userVolumeMount"])
    assert volumes.keys() == mounts.keys() == {"flagella-sock"}
    (configmap,) = yaml.safe_load_all((ROOT / "manifests" / "configmap.yaml").read_text())
    agent = yaml.safe_load(configmap["data"]["flagella.yaml"])
    host_dir = volumes["flagella-sock"]["hostPath"]["path"]
    assert host_dir == str(Path(agent["proxy"]["xds_socket"]).parent)
    assert Path(agent["state_dir"]) != Path(host_dir)
    assert mounts["flagella-sock"]["mountPath"] == str(Path(IstioSettings().socket_in_pod).parent)
    pod = {"metadata": {"name": "leia", "namespace": "default",
                        "annotations": {"sidecar.istio.io/status": "{}"}},
           "spec": {"containers": [{"name": "istio-proxy", "volumeMounts": [
               {"name": "flagella-sock", **mounts["flagella-sock"]}]}],
               "volumes": [{"name": "flagella-sock", **volumes["flagella-sock"]}]}, "status": {}}
    assert has_flagella_sidecar(pod_info(pod).istio_proxy_mounts, IstioSettings().socket_in_pod,
                                agent["proxy"]["xds_socket"])


@pytest.mark.parametrize("name", ["init-policy.yaml", "leia-policy.yaml"])
def test_policies_load(name: str) -> None:
    assert load_policies((MANIFESTS / name).read_text())


def test_kafka_envoyfilter_matches_the_crd_and_envoy() -> None:
    from envoy.config.listener.v3 import listener_components_pb2

    from flagella.istio.workload import kafka_resource_names

    (doc,) = _docs("envoyfilter-kafka.yaml")
    assert validate_resource(doc, "envoyfilter-crd.yaml") == []
    patches = doc["spec"]["configPatches"]
    names = []
    for patch in patches:
        assert patch["match"]["context"] == "SIDECAR_INBOUND"
        assert patch["match"]["listener"]["filterChain"]["filter"]["name"] == "envoy.filters.network.tcp_proxy"
        assert (patch["applyTo"], patch["patch"]["operation"]) == ("NETWORK_FILTER", "INSERT_BEFORE")
        filt = json_format.ParseDict(patch["patch"]["value"], listener_components_pb2.Filter())
        (service,) = filt.config_discovery.config_source.api_config_source.grpc_services
        assert service.google_grpc.target_uri == "unix:///var/run/flagella/xds.sock"
        names.append(filt.name)
    # In this order before tcp_proxy: RBAC (who the peer is), then ext_proc.
    assert tuple(names) == kafka_resource_names(patches[0]["match"]["listener"]["portNumber"])
    rbac = json_format.ParseDict(patches[0]["patch"]["value"], listener_components_pb2.Filter())
    assert rbac.config_discovery.default_config.type_url.endswith("network.rbac.v3.RBAC")  # fail closed
