"""Kubernetes ``networking.k8s.io/v1`` NetworkPolicy -> one Cilium `Rule` (spec 2).

Theory of operation
-------------------
The document is validated the way the API server would (field sets, label
key and value syntax, port names, ipBlock containment) with the readers of
`_parse`, then translated as modern Cilium does, which fixes the 1.1 gaps:

* ``podSelector`` (target and peer): keys get the ``k8s:`` source and the
  selector is pinned to the policy's namespace.
* ``namespaceSelector``: keys become ``k8s:io.cilium.k8s.namespace.labels.<key>``;
  the empty selector means every pod of every namespace
  (``k8s:io.kubernetes.pod.namespace`` Exists), not every identity (1.1 bug
  #4513). With a ``podSelector`` in the same peer both are ANDed in one selector.
* ``ipBlock`` becomes a CIDR rule with its excepts.
* The peers of one rule are unioned into one `PeerRule`; a rule without peers
  (no ``from``/``to``, or an empty list) allows every peer, world included.
* Each NetworkPolicyPort becomes its own `PortRule`; the protocol defaults to
  TCP; no port means every port of the protocol; named ports and ``endPort``
  ranges are kept.
* policyTypes: a direction the policy governs is always present in the rule.
  With no rule for it the section is ``(PeerRule(),)``, an empty rule that
  selects no peer, so the selected pods are isolated with nothing allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from flagella.policy.api._model import (
    CIDRRule,
    LabelSelector,
    PeerRule,
    PortProtocol,
    PortRule,
    Protocol,
    Requirement,
    Rule,
)
from flagella.policy.api._parse import (
    NAMESPACE_LABEL,
    Ctx,
    Fields,
    KeyFn,
    Metadata,
    index,
    is_label_key,
    is_port_name,
    join,
    parse_cidr_with_excepts,
    parse_metadata,
    parse_selector,
    policy_labels,
    read_list,
    read_object,
    read_str,
    type_name,
    with_match_label,
)

#: Identity label prefix under which Cilium stores the labels of a pod's namespace.
NAMESPACE_LABELS_PREFIX: Final = "k8s:io.cilium.k8s.namespace.labels."

_DOCUMENT_FIELDS: Final = Fields(("apiVersion", "kind", "metadata", "spec", "status"))
_SPEC_FIELDS: Final = Fields(("podSelector", "ingress", "egress", "policyTypes"))
_INGRESS_FIELDS: Final = Fields(("from", "ports"))
_EGRESS_FIELDS: Final = Fields(("to", "ports"))
_PEER_FIELDS: Final = Fields(("podSelector", "namespaceSelector", "ipBlock"))
_IP_BLOCK_FIELDS: Final = Fields(("cidr", "except"))
_PORT_FIELDS: Final = Fields(("protocol", "port", "endPort"))

_PROTOCOLS: Final = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP}
_DIGITS_RE: Final = re.compile(r"[0-9]+")


def _k8s_key(prefix: str) -> KeyFn:
    def key_fn(ctx: Ctx, key: str, path: str) -> str | None:
        if not is_label_key(key):
            ctx.error(path, f"invalid label key {key!r}: must be [DNS subdomain/]name, the "
                      "name at most 63 of [A-Za-z0-9-_.] beginning and ending alphanumeric")
            return None
        return prefix + key

    return key_fn


_POD_KEY: Final = _k8s_key("k8s:")
_NAMESPACE_KEY: Final = _k8s_key(NAMESPACE_LABELS_PREFIX)


def _merge(first: LabelSelector, second: LabelSelector) -> LabelSelector:
    """Both selectors ANDed; a key matched to two values becomes an In requirement."""
    labels = dict(first.match_labels)
    expressions = [*first.match_expressions, *second.match_expressions]
    for key, value in second.match_labels:
        if key in labels and labels[key] != value:
            expressions.append(Requirement(key, "In", (value,)))
        else:
            labels[key] = value
    return LabelSelector(tuple(sorted(labels.items())), tuple(expressions))


def _parse_peer(
    ctx: Ctx, value: object, path: str, namespace: str
) -> LabelSelector | CIDRRule | None:
    fields = read_object(ctx, value, path, _PEER_FIELDS)
    if fields is None:
        return None
    if not fields:
        ctx.error(path, "must specify podSelector, namespaceSelector or ipBlock")
        return None
    if "ipBlock" in fields:
        if "podSelector" in fields or "namespaceSelector" in fields:
            ctx.error(path, "ipBlock may not be combined with podSelector or namespaceSelector")
        return _parse_ip_block(ctx, fields["ipBlock"], join(path, "ipBlock"))
    pods = LabelSelector()
    if "podSelector" in fields:
        pods = parse_selector(ctx, fields["podSelector"], join(path, "podSelector"), _POD_KEY,
                              check_values=True)
    if "namespaceSelector" not in fields:
        return with_match_label(pods, NAMESPACE_LABEL, namespace)
    namespaces = parse_selector(ctx, fields["namespaceSelector"], join(path, "namespaceSelector"),
                                _NAMESPACE_KEY, check_values=True)
    if namespaces.is_wildcard:
        namespaces = LabelSelector((), (Requirement(NAMESPACE_LABEL, "Exists"),))
    return _merge(namespaces, pods)


def _parse_ip_block(ctx: Ctx, value: object, path: str) -> CIDRRule | None:
    fields = read_object(ctx, value, path, _IP_BLOCK_FIELDS)
    if fields is None:
        return None
    if "cidr" not in fields:
        ctx.error(join(path, "cidr"), "required")
        return None
    return parse_cidr_with_excepts(ctx, fields, path, plain_except=False, strict_subset=True)


def _parse_port(ctx: Ctx, value: object, path: str) -> PortProtocol | None:
    fields = read_object(ctx, value, path, _PORT_FIELDS)
    if fields is None:
        return None
    ok = True
    protocol = Protocol.TCP
    if "protocol" in fields:
        raw_proto = read_str(ctx, fields["protocol"], join(path, "protocol"))
        found = _PROTOCOLS.get(raw_proto.upper()) if raw_proto is not None else None
        if found is None:
            if raw_proto is not None:
                ctx.error(join(path, "protocol"),
                          f"invalid protocol {raw_proto!r}: must be TCP, UDP or SCTP")
            ok = False
        else:
            protocol = found
    number, name = 0, ""
    if "port" in fields:
        port_path = join(path, "port")
        raw = fields["port"]
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            ctx.error(port_path, f"must be an integer or a port name, not {type_name(raw)}")
            ok = False
        elif isinstance(raw, str) and not _DIGITS_RE.fullmatch(raw):
            if is_port_name(raw):
                name = raw
            else:
                ctx.error(port_path, f"invalid port name {raw!r}: at most 15 of [a-z0-9-] with "
                          "a letter, no leading, trailing or double '-'")
                ok = False
        else:
            number = int(raw)
            if not 1 <= number <= 65535:
                ctx.error(port_path, "must be 1-65535")
                ok = False
    end_port = 0
    if "endPort" in fields:
        end_path = join(path, "endPort")
        raw_end = fields["endPort"]
        if isinstance(raw_end, bool) or not isinstance(raw_end, int):
            ctx.error(end_path, f"must be an integer, not {type_name(raw_end)}")
            ok = False
        elif name or number == 0:
            ctx.error(end_path, "may only be given with a numeric port")
            ok = False
        elif not number <= raw_end <= 65535:
            ctx.error(end_path, f"must be between port ({number}) and 65535")
            ok = False
        elif raw_end != number:
            end_port = raw_end
    if not ok:
        return None
    return PortProtocol(port=number, protocol=protocol, end_port=end_port, name=name)


def _parse_rule(
    ctx: Ctx, value: object, path: str, namespace: str, *, ingress: bool
) -> PeerRule:
    peers_name = "from" if ingress else "to"
    fields = read_object(ctx, value, path, _INGRESS_FIELDS if ingress else _EGRESS_FIELDS)
    if fields is None:
        return PeerRule()
    selectors: list[LabelSelector] = []
    cidrs: list[CIDRRule] = []
    peers = read_list(ctx, fields[peers_name], join(path, peers_name)) if peers_name in fields else []
    for i, raw in enumerate(peers):
        peer = _parse_peer(ctx, raw, index(join(path, peers_name), i), namespace)
        if isinstance(peer, CIDRRule):
            cidrs.append(peer)
        elif peer is not None:
            selectors.append(peer)
    ports: list[PortRule] = []
    if "ports" in fields:
        ports_path = join(path, "ports")
        for i, raw in enumerate(read_list(ctx, fields["ports"], ports_path)):
            port = _parse_port(ctx, raw, index(ports_path, i))
            if port is not None:
                ports.append(PortRule(ports=(port,)))
    return PeerRule(
        selectors=tuple(selectors),
        cidrs=tuple(cidrs),
        any_peer=not peers,
        ports=tuple(ports),
    )


def _parse_policy_types(ctx: Ctx, value: object) -> set[str] | None:
    """The directions named in policyTypes, or None when it is absent or empty."""
    found: set[str] = set()
    for i, raw in enumerate(read_list(ctx, value, "spec.policyTypes")):
        text = read_str(ctx, raw, index("spec.policyTypes", i))
        if text is None:
            continue
        if text.lower() not in ("ingress", "egress"):
            ctx.error(index("spec.policyTypes", i), f"invalid policy type {text!r}: must be "
                      "Ingress or Egress")
            continue
        found.add(text.capitalize())
    return found or None


def parse_network_policy(
    ctx: Ctx, obj: Mapping[str, object]
) -> tuple[Metadata, tuple[Rule, ...]]:
    """A whole NetworkPolicy document -> its metadata and its one rule."""
    fields = read_object(ctx, obj, "", _DOCUMENT_FIELDS) or {}
    if "apiVersion" in fields:
        api_version = read_str(ctx, fields["apiVersion"], "apiVersion")
        if api_version is not None and api_version != "networking.k8s.io/v1":
            ctx.error("apiVersion", f"unsupported apiVersion {api_version!r} for NetworkPolicy: "
                      "must be networking.k8s.io/v1")
    meta = parse_metadata(ctx, fields.get("metadata"), namespaced=True)
    if "spec" not in fields:
        ctx.error("spec", "required")
        return meta, ()
    spec = read_object(ctx, fields["spec"], "spec", _SPEC_FIELDS)
    if spec is None:
        return meta, ()
    if "podSelector" not in spec:
        ctx.error("spec.podSelector", "required (use {} to select every pod of the namespace)")
        target = LabelSelector()
    else:
        target = parse_selector(ctx, spec["podSelector"], "spec.podSelector", _POD_KEY,
                                check_values=True)
    target = with_match_label(target, NAMESPACE_LABEL, meta.namespace)

    sections: dict[str, tuple[PeerRule, ...]] = {}
    for name, is_ingress in (("ingress", True), ("egress", False)):
        raw_rules = read_list(ctx, spec[name], join("spec", name)) if name in spec else []
        sections[name] = tuple(
            _parse_rule(ctx, raw, index(join("spec", name), i), meta.namespace, ingress=is_ingress)
            for i, raw in enumerate(raw_rules)
        )

    types = _parse_policy_types(ctx, spec["policyTypes"]) if "policyTypes" in spec else None
    enforce_ingress = types is None or "Ingress" in types
    enforce_egress = bool(sections["egress"]) if types is None else "Egress" in types
    for name, enforced in (("ingress", enforce_ingress), ("egress", enforce_egress)):
        if sections[name] and not enforced:
            ctx.warn(join("spec", name), f"ignored: policyTypes does not include "
                     f"{name.capitalize()}")

    def section(name: str, enforced: bool) -> tuple[PeerRule, ...] | None:
        if not enforced:
            return None
        return sections[name] or (PeerRule(),)

    rule = Rule(
        endpoint_selector=target,
        ingress=section("ingress", enforce_ingress),
        egress=section("egress", enforce_egress),
        labels=tuple(policy_labels("NetworkPolicy", meta)),
    )
    return meta, (rule,)
