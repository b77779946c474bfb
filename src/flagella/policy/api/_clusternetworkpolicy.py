"""Kubernetes ClusterNetworkPolicy (``policy.networking.k8s.io/v1alpha2``) -> tiered `Rule`s.

Theory of operation
-------------------
ClusterNetworkPolicy is the network-policy-api project's successor of
AdminNetworkPolicy and BaselineAdminNetworkPolicy: a cluster-scoped object
with a ``tier`` (``Admin`` or ``Baseline``), a ``priority`` (0-1000, lower
first), a ``subject`` (the pods it applies to) and ordered ingress/egress
rules whose ``action`` is ``Accept``, ``Deny`` or ``Pass``.

The document is validated as the CRD schema would (field sets, exactly-one
unions, list bounds, port and CIDR syntax) with the readers of `_parse`,
then translated as modern Cilium does (``pkg/k8s/cluster_network_policy.go``):

* Each ingress/egress rule becomes one `Rule` with ``tier`` ``admin`` or
  ``baseline`` and ``precedence = priority * 10000 + index`` (its position
  in its direction's list), so across policies the lower priority comes
  first and within a policy the earlier rule. Its peers are unioned into one
  `PeerRule` placed in the allow (Accept), deny (Deny) or pass (Pass)
  section of its direction. Rules never enable default deny.
* ``subject.namespaces`` and ``namespaces`` peers: keys become
  ``k8s:io.cilium.k8s.namespace.labels.<key>`` as in a NetworkPolicy
  namespaceSelector (`_k8s`); ``pods`` peers AND a namespace selector
  (default: every namespace) with a ``k8s:`` pod selector. Both only ever
  select pods: a namespace part without matchLabels also requires
  ``k8s:io.kubernetes.pod.namespace`` to exist.
* ``networks`` (egress) become CIDR rules.
* A rule without peers (``from``/``to`` absent or empty) applies to every
  peer, as Cilium reads it (the CRD requires at least one peer, but
  Cilium's own tests use ``- action: Deny`` alone as "deny the rest").
* ``protocols``: ``tcp``/``udp``/``sctp`` with a ``destinationPort`` number
  or range, or a ``destinationNamedPort`` (any protocol). No protocols: all
  ports and protocols.
* ``nodes`` and ``domainNames`` peers cannot be resolved here: in an Accept
  rule they are accepted with a warning and select no peer; in a Deny or
  Pass rule (where ignoring them would widen what passes) they are errors.

Without an ``apiVersion`` the kind is ambiguous (Antrea has a
ClusterNetworkPolicy of its own, ``crd.antrea.io``), so it is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal

from flagella.policy.api._k8s import _NAMESPACE_KEY, _POD_KEY, _merge
from flagella.policy.api._model import (
    CIDRRule,
    LabelSelector,
    PeerRule,
    PortProtocol,
    PortRule,
    Protocol,
    Requirement,
    Rule,
    Tier,
)
from flagella.policy.api._parse import (
    NAMESPACE_LABEL,
    Ctx,
    Fields,
    Metadata,
    index,
    is_port_name,
    join,
    parse_cidr,
    parse_metadata,
    parse_selector,
    policy_labels,
    read_list,
    read_object,
    read_str,
    type_name,
    with_requirement,
)

KIND: Final = "ClusterNetworkPolicy"
API_GROUP: Final = "policy.networking.k8s.io"
#: v1beta1 has the same schema as the (newest) v1alpha2.
API_VERSIONS: Final = (f"{API_GROUP}/v1alpha2", f"{API_GROUP}/v1beta1")

#: ``Rule.precedence = priority * PRIORITY_STRIDE + rule index``.
PRIORITY_STRIDE: Final = 10000
MAX_PRIORITY: Final = 1000
#: Most rules per direction, peers per rule, protocols per rule, CIDRs or names per peer.
MAX_ITEMS: Final = 25
MAX_RULE_NAME: Final = 100
MAX_CIDR_LENGTH: Final = 43

Action = Literal["Accept", "Deny", "Pass"]
_ACTIONS: Final[dict[str, Action]] = {"accept": "Accept", "deny": "Deny", "pass": "Pass"}
_TIERS: Final[dict[str, Tier]] = {"admin": "admin", "baseline": "baseline"}
_PROTOCOLS: Final = {"tcp": Protocol.TCP, "udp": Protocol.UDP, "sctp": Protocol.SCTP}

_DOCUMENT_FIELDS: Final = Fields(("apiVersion", "kind", "metadata", "spec", "status"))
_SPEC_FIELDS: Final = Fields(("tier", "priority", "subject", "ingress", "egress"))
_SUBJECT_FIELDS: Final = Fields(("namespaces", "pods"))
_NAMESPACED_POD_FIELDS: Final = Fields(("namespaceSelector", "podSelector"))
_INGRESS_RULE_FIELDS: Final = Fields(("name", "action", "from", "protocols"))
_EGRESS_RULE_FIELDS: Final = Fields(("name", "action", "to", "protocols"))
_INGRESS_PEER_FIELDS: Final = Fields(("namespaces", "pods"))
_EGRESS_PEER_FIELDS: Final = Fields(("namespaces", "pods", "nodes", "networks", "domainNames"))
_PROTOCOL_FIELDS: Final = Fields(("tcp", "udp", "sctp", "destinationNamedPort"))
_PROTOCOL_MATCH_FIELDS: Final = Fields(("destinationPort",))
_PORT_FIELDS: Final = Fields(("number", "range"))
_RANGE_FIELDS: Final = Fields(("start", "end"))

_DOMAIN_NAME_RE: Final = re.compile(
    r"(\*\.)?([a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?"
)


def _one_of(
    ctx: Ctx, raw: object, fields: dict[str, object], path: str, spec: Fields
) -> str | None:
    """The one field an exactly-one-of object sets, or None after an error.

    An object whose only fields are unknown ones already has its errors.
    """
    given = [name for name in spec.names if name in fields]
    if len(given) == 1:
        return given[0]
    choices = ", ".join(spec.names)
    if given:
        ctx.error(path, f"exactly one of {choices} may be set, not {' and '.join(given)}")
    elif not isinstance(raw, Mapping) or all(
        isinstance(key, str) and spec.canonical(key) is not None for key in raw
    ):
        ctx.error(path, f"must set exactly one of {choices}")
    return None


def _bounded_list(ctx: Ctx, value: object, path: str, *, allow_empty: bool = True) -> list[object]:
    entries = read_list(ctx, value, path)
    if len(entries) > MAX_ITEMS:
        ctx.error(path, f"too many items ({len(entries)}), the max is {MAX_ITEMS}")
    if not entries and not allow_empty and isinstance(value, list | tuple):
        ctx.error(path, "must not be empty (omit the field instead)")
    return entries


def _pods_only(selector: LabelSelector) -> LabelSelector:
    """A namespace-part selector that can only select pods.

    With matchLabels it already requires a namespace label; otherwise (the
    empty selector, or expressions only, which ``NotIn``/``DoesNotExist``
    would let match the host or the world) the pod namespace must exist.
    """
    if selector.match_labels:
        return selector
    return with_requirement(selector, Requirement(NAMESPACE_LABEL, "Exists"))


def _namespaces(ctx: Ctx, value: object, path: str) -> LabelSelector:
    return _pods_only(parse_selector(ctx, value, path, _NAMESPACE_KEY, check_values=True))


def _namespaced_pod(ctx: Ctx, value: object, path: str) -> LabelSelector:
    fields = read_object(ctx, value, path, _NAMESPACED_POD_FIELDS)
    if fields is None:
        return _pods_only(LabelSelector())
    namespaces = LabelSelector()
    if "namespaceSelector" in fields:
        namespaces = parse_selector(ctx, fields["namespaceSelector"],
                                    join(path, "namespaceSelector"), _NAMESPACE_KEY,
                                    check_values=True)
    pods = LabelSelector()
    if "podSelector" not in fields:
        ctx.error(join(path, "podSelector"), "required (use {} to select every pod)")
    else:
        pods = parse_selector(ctx, fields["podSelector"], join(path, "podSelector"), _POD_KEY,
                              check_values=True)
    return _merge(_pods_only(namespaces), pods)


def _parse_subject(ctx: Ctx, value: object, path: str) -> LabelSelector:
    fields = read_object(ctx, value, path, _SUBJECT_FIELDS)
    if fields is None:
        return LabelSelector()
    which = _one_of(ctx, value, fields, path, _SUBJECT_FIELDS)
    if which == "namespaces":
        return _namespaces(ctx, fields["namespaces"], join(path, "namespaces"))
    if which == "pods":
        return _namespaced_pod(ctx, fields["pods"], join(path, "pods"))
    return LabelSelector()


def _parse_networks(ctx: Ctx, value: object, path: str) -> list[CIDRRule]:
    out: list[CIDRRule] = []
    for i, raw in enumerate(_bounded_list(ctx, value, path, allow_empty=False)):
        item_path = index(path, i)
        if isinstance(raw, str) and len(raw) > MAX_CIDR_LENGTH:
            ctx.error(item_path, f"longer than {MAX_CIDR_LENGTH} characters")
            continue
        network = parse_cidr(ctx, raw, item_path, allow_plain_ip=False)
        if network is not None:
            out.append(CIDRRule(network))
    return out


def _check_domain_names(ctx: Ctx, value: object, path: str) -> None:
    for i, raw in enumerate(_bounded_list(ctx, value, path, allow_empty=False)):
        text = read_str(ctx, raw, index(path, i))
        if text is not None and _DOMAIN_NAME_RE.fullmatch(text) is None:
            ctx.error(index(path, i), f"invalid domain name {text!r}: DNS labels separated by "
                      "'.', optionally after a leading '*.'")


class _Peers:
    """The peers of one rule, unioned: selectors and CIDRs, plus what named ports need."""

    def __init__(self) -> None:
        self.selectors: list[LabelSelector] = []
        self.cidrs: list[CIDRRule] = []
        self.without_named_ports: str = ""  # the first peer kind that has no named ports


def _parse_peer(
    ctx: Ctx, value: object, path: str, *, ingress: bool, action: Action | None, peers: _Peers
) -> None:
    fields = read_object(ctx, value, path, _INGRESS_PEER_FIELDS if ingress else _EGRESS_PEER_FIELDS)
    if fields is None:
        return
    which = _one_of(ctx, value, fields, path, _INGRESS_PEER_FIELDS if ingress else _EGRESS_PEER_FIELDS)
    if which is None:
        return
    raw, field_path = fields[which], join(path, which)
    if which == "namespaces":
        peers.selectors.append(_namespaces(ctx, raw, field_path))
    elif which == "pods":
        peers.selectors.append(_namespaced_pod(ctx, raw, field_path))
    elif which == "networks":
        peers.cidrs.extend(_parse_networks(ctx, raw, field_path))
        peers.without_named_ports = peers.without_named_ports or which
    elif which == "nodes":
        parse_selector(ctx, raw, field_path, _POD_KEY, check_values=True)
        peers.without_named_ports = peers.without_named_ports or which
        if action == "Accept":
            ctx.warn(field_path, "a node peer cannot be enforced: it allows no peer")
        elif action is not None:
            ctx.error(field_path, f"a node peer cannot be enforced in a {action} rule")
    else:  # domainNames
        _check_domain_names(ctx, raw, field_path)
        peers.without_named_ports = peers.without_named_ports or which
        if action == "Accept":
            ctx.warn(field_path, "a DNS name peer cannot be enforced: it allows no peer")
        elif action is not None:
            ctx.error(field_path, "domainNames is only supported in Accept rules")


def _read_port_number(ctx: Ctx, value: object, path: str) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.error(path, f"must be an integer, not {type_name(value)}")
        return None
    if not 1 <= value <= 65535:
        ctx.error(path, "must be 1-65535")
        return None
    return value


def _parse_destination_port(
    ctx: Ctx, value: object, path: str, protocol: Protocol
) -> PortProtocol | None:
    fields = read_object(ctx, value, path, _PORT_FIELDS)
    if fields is None:
        return None
    which = _one_of(ctx, value, fields, path, _PORT_FIELDS)
    if which == "number":
        number = _read_port_number(ctx, fields["number"], join(path, "number"))
        return None if number is None else PortProtocol(port=number, protocol=protocol)
    if which != "range":
        return None
    range_path = join(path, "range")
    bounds = read_object(ctx, fields["range"], range_path, _RANGE_FIELDS)
    if bounds is None:
        return None
    found: dict[str, int] = {}
    for name in ("start", "end"):
        if name not in bounds:
            ctx.error(join(range_path, name), "required")
            continue
        number = _read_port_number(ctx, bounds[name], join(range_path, name))
        if number is not None:
            found[name] = number
    if len(found) != 2:
        return None
    if found["start"] >= found["end"]:
        ctx.error(range_path, f"start ({found['start']}) must be less than end ({found['end']})")
        return None
    return PortProtocol(port=found["start"], protocol=protocol, end_port=found["end"])


def _parse_protocol(ctx: Ctx, value: object, path: str) -> PortProtocol | None:
    fields = read_object(ctx, value, path, _PROTOCOL_FIELDS)
    if fields is None:
        return None
    which = _one_of(ctx, value, fields, path, _PROTOCOL_FIELDS)
    if which is None:
        return None
    field_path = join(path, which)
    if which == "destinationNamedPort":
        name = read_str(ctx, fields[which], field_path)
        if name is None:
            return None
        # Cilium matches port names case-insensitively (it lower-cases them).
        if not is_port_name(name.lower()):
            ctx.error(field_path, f"invalid port name {name!r}: at most 15 of [a-z0-9-] with a "
                      "letter, no leading, trailing or double '-'")
            return None
        return PortProtocol(protocol=Protocol.ANY, name=name.lower())
    match = read_object(ctx, fields[which], field_path, _PROTOCOL_MATCH_FIELDS)
    if match is None:
        return None
    if "destinationPort" not in match:
        ctx.error(join(field_path, "destinationPort"),
                  "required (omit protocols to match every port)")
        return None
    return _parse_destination_port(ctx, match["destinationPort"],
                                   join(field_path, "destinationPort"), _PROTOCOLS[which])


def _parse_rule(
    ctx: Ctx,
    value: object,
    path: str,
    *,
    ingress: bool,
    position: int,
    subject: LabelSelector,
    tier: Tier,
    priority: int,
    labels: tuple[str, ...],
) -> Rule | None:
    fields = read_object(ctx, value, path, _INGRESS_RULE_FIELDS if ingress else _EGRESS_RULE_FIELDS)
    if fields is None:
        return None
    name = ""
    if "name" in fields:
        name = read_str(ctx, fields["name"], join(path, "name")) or ""
        if len(name) > MAX_RULE_NAME:
            ctx.error(join(path, "name"), f"longer than {MAX_RULE_NAME} characters")
    action: Action | None = None
    if "action" not in fields:
        ctx.error(join(path, "action"), "required: Accept, Deny or Pass")
    else:
        raw_action = read_str(ctx, fields["action"], join(path, "action"))
        if raw_action is not None:
            action = _ACTIONS.get(raw_action.lower())
            if action is None:
                ctx.error(join(path, "action"), f"invalid action {raw_action!r}: must be "
                          "Accept, Deny or Pass")

    peers_name = "from" if ingress else "to"
    peers = _Peers()
    entries = (
        _bounded_list(ctx, fields[peers_name], join(path, peers_name))
        if peers_name in fields else []
    )
    for i, raw in enumerate(entries):
        _parse_peer(ctx, raw, index(join(path, peers_name), i), ingress=ingress, action=action,
                    peers=peers)

    ports: list[PortRule] = []
    if "protocols" in fields:
        protocols_path = join(path, "protocols")
        for i, raw in enumerate(_bounded_list(ctx, fields["protocols"], protocols_path,
                                              allow_empty=False)):
            port = _parse_protocol(ctx, raw, index(protocols_path, i))
            if port is None:
                continue
            if port.name and peers.without_named_ports:
                ctx.error(index(protocols_path, i), f"a destinationNamedPort cannot be used with "
                          f"a {peers.without_named_ports} peer (it has no named ports)")
                continue
            ports.append(PortRule(ports=(port,)))

    if action is None:
        return None
    peer = PeerRule(
        selectors=tuple(peers.selectors),
        cidrs=tuple(peers.cidrs),
        any_peer=not entries,
        ports=tuple(ports),
    )

    def section(wanted_ingress: bool, wanted: Action) -> tuple[PeerRule, ...] | None:
        return (peer,) if (ingress, action) == (wanted_ingress, wanted) else None

    return Rule(
        endpoint_selector=subject,
        ingress=section(True, "Accept"),
        egress=section(False, "Accept"),
        ingress_deny=section(True, "Deny"),
        egress_deny=section(False, "Deny"),
        ingress_pass=section(True, "Pass"),
        egress_pass=section(False, "Pass"),
        labels=labels,
        description=name,
        default_deny_ingress=False,
        default_deny_egress=False,
        tier=tier,
        precedence=priority * PRIORITY_STRIDE + position,
    )


def _parse_tier(ctx: Ctx, spec: Mapping[str, object]) -> Tier | None:
    if "tier" not in spec:
        ctx.error("spec.tier", "required: Admin or Baseline")
        return None
    text = read_str(ctx, spec["tier"], "spec.tier")
    if text is None:
        return None
    tier = _TIERS.get(text.lower())
    if tier is None:
        ctx.error("spec.tier", f"invalid tier {text!r}: must be Admin or Baseline")
    return tier


def _parse_priority(ctx: Ctx, spec: Mapping[str, object]) -> int | None:
    if "priority" not in spec:
        ctx.error("spec.priority", f"required: 0-{MAX_PRIORITY}, lower first")
        return None
    raw = spec["priority"]
    if isinstance(raw, bool) or not isinstance(raw, int):
        ctx.error("spec.priority", f"must be an integer, not {type_name(raw)}")
        return None
    if not 0 <= raw <= MAX_PRIORITY:
        ctx.error("spec.priority", f"must be 0-{MAX_PRIORITY}")
        return None
    return raw


def parse_cluster_network_policy(
    ctx: Ctx, obj: Mapping[str, object]
) -> tuple[Metadata, tuple[Rule, ...]] | None:
    """A whole ClusterNetworkPolicy document -> its metadata and one rule per ingress/egress rule.

    None when the document is not this API's ClusterNetworkPolicy at all
    (no or another apiVersion); the error says so and nothing else is checked.
    """
    fields = read_object(ctx, obj, "", _DOCUMENT_FIELDS) or {}
    if "apiVersion" not in fields:
        ctx.error("kind", f"{KIND} without apiVersion is ambiguous: supported is "
                  f"{API_VERSIONS[0]} (set apiVersion)")
        return None
    api_version = read_str(ctx, fields["apiVersion"], "apiVersion")
    if api_version is None:
        return None
    if api_version not in API_VERSIONS:
        ctx.error("apiVersion", f"unsupported apiVersion {api_version!r} for {KIND}: must be "
                  f"{' or '.join(API_VERSIONS)}")
        return None
    meta = parse_metadata(ctx, fields.get("metadata"), namespaced=False)
    if "spec" not in fields:
        ctx.error("spec", "required")
        return meta, ()
    spec = read_object(ctx, fields["spec"], "spec", _SPEC_FIELDS)
    if spec is None:
        return meta, ()
    tier = _parse_tier(ctx, spec)
    priority = _parse_priority(ctx, spec)
    subject = LabelSelector()
    if "subject" not in spec:
        ctx.error("spec.subject", "required: namespaces or pods")
    else:
        subject = _parse_subject(ctx, spec["subject"], "spec.subject")
    labels = tuple(policy_labels(KIND, meta))

    rules: list[Rule] = []
    for name, ingress in (("ingress", True), ("egress", False)):
        if name not in spec:
            continue
        path = join("spec", name)
        for i, raw in enumerate(_bounded_list(ctx, spec[name], path)):
            rule = _parse_rule(
                ctx, raw, index(path, i), ingress=ingress, position=i, subject=subject,
                tier=tier or "admin", priority=priority or 0, labels=labels,
            )
            if rule is not None:
                rules.append(rule)
    return meta, tuple(rules)
