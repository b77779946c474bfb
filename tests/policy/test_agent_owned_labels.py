"""Labels the agent owns: whatever a pod's labels say, the derived keys come from the agent."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flagella.endpoint.model import Endpoint
from flagella.errors import InputError
from flagella.policy.labels import (
    CLUSTER_LABEL,
    NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX,
    SERVICE_ACCOUNT_LABEL,
    check_pod_labels,
    is_agent_owned,
    k8s_labels,
)

OWNED = [
    NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX + "team",
    SERVICE_ACCOUNT_LABEL,
    CLUSTER_LABEL,
    "io.cilium.k8s.anything.new",
]
keys = st.one_of(st.sampled_from(OWNED), st.from_regex(r"[a-z]([a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True))
values = st.from_regex(r"([a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?)?", fullmatch=True)
label_maps = st.dictionaries(keys, values, max_size=6)


@given(pod=label_maps, ns_labels=label_maps, sa=st.sampled_from([None, "default", "admin"]))
def test_derived_keys_come_from_the_agent_only(pod, ns_labels, sa):
    labels = k8s_labels(pod, "lbl", ns_labels, sa)
    owned = {(x.key, x.value) for x in labels if is_agent_owned(x.key)}
    want = {(NAMESPACE_LABEL, "lbl"), (CLUSTER_LABEL, "default")}
    want |= {(NAMESPACE_LABELS_PREFIX + k, v) for k, v in ns_labels.items() if not is_agent_owned(k)}
    if sa:
        want.add((SERVICE_ACCOUNT_LABEL, sa))
    assert owned == want
    assert {(x.key, x.value) for x in labels} - owned == {
        (k, v) for k, v in pod.items() if not is_agent_owned(k)
    }


def test_a_record_with_a_forged_namespace_gets_its_real_one():
    """A record written by an older agent, or a pod spec relayed by a watcher: overwritten."""
    ep = Endpoint(1, "evil", "lbl", {"app": "admin", NAMESPACE_LABEL: "kube-system"})
    namespaces = [x.value for x in ep.identity_labels() if x.key == NAMESPACE_LABEL]
    assert namespaces == ["lbl"]


@pytest.mark.parametrize("key", OWNED)
def test_check_pod_labels_names_the_reserved_key(key):
    with pytest.raises(InputError, match=f"--labels: label key '{key}' is reserved"):
        check_pod_labels({"app": "admin", key: "x"}, "--labels")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("a b", "x", "invalid label key 'a b'"),
        ("bad key!", "x", "invalid label key 'bad key!'"),
        ("example.com/" + "n" * 64, "x", "invalid label key"),
        ("Bad_Prefix/app", "x", "invalid label key"),
        ("app", "bad value", "invalid value 'bad value'"),
        ("app", "v" * 64, "invalid value"),
        ("app", "-x", "invalid value"),
    ],
)
def test_check_pod_labels_follows_kubernetes_rules(key, value, message):
    with pytest.raises(InputError, match=message):
        check_pod_labels({key: value}, "--labels")


def test_check_pod_labels_accepts_kubernetes_labels():
    check_pod_labels(
        {"app": "x", "app.kubernetes.io/name": "web", "v": "", "a": "v" * 63, "n" * 63: "A_b.c-d"},
        "--labels",
    )
