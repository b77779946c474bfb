"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy documents -> `Rule`s.

Theory of operation
-------------------
A document is walked top-down, by hand, against the field sets of the CRD
schema (``cilium.io/v2``). Every reader takes a `Ctx`, the raw value and the
value's path (``specs[0].ingress[1].toPorts[0].ports[0].port``), records each
problem as a `FieldError` and returns the best value it can, so that one pass
reports every error of the document; the caller turns a non-empty error list
into `PolicyValidationError` and returns nothing. Nothing here raises on bad
input, and nothing does I/O.

Object keys are matched case-insensitively, as Go's JSON decoder does (the
1.1 examples write ``HTTP:``); two spellings of one field are an error.
Unknown fields are errors, except a peer field of the *other* direction
(``fromEndpoints`` in an egress rule): Cilium ignores it and the API server
prunes it, and a real manifest (the Kafka e2e test) has one, so it is
dropped with a warning.

Fields Flagella cannot enforce are handled by which way ignoring them would
err:

* Peers it cannot resolve (``toFQDNs``, ``toServices``, ``toGroups``,
  ``fromNodes``/``toNodes``, ``cidrGroupRef``) are accepted in allow rules
  with a warning and contribute *no* peer. They still count as an L3 member,
  so a rule ``{toFQDNs, toPorts}`` grants nothing rather than every peer.
  In deny rules that narrowing would widen what is allowed: errors there.
* DNS L7 rules are accepted with a warning: the port is allowed at L4 and
  queries are not filtered (pods keep resolving names).
* Modifiers whose absence would widen a rule (mutual ``authentication``
  other than ``disabled``, TLS interception, ``serverNames``, an Envoy
  ``listener``, generic ``l7proto``) are errors.

Translation applied here (spec 1.6): selector keys gain their label source
(``org`` -> ``any:org``, ``$host`` -> ``reserved:host``), and selectors of a
namespaced document are pinned to its namespace; peers of a cluster-wide
document are limited to pods (``k8s:io.kubernetes.pod.namespace`` Exists),
as modern Cilium does.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from flagella.errors import FieldError
from flagella.policy.api._kafka import KAFKA_MAX_TOPIC_LENGTH, kafka_api_key, kafka_role_keys
from flagella.policy.api._model import (
    CIDRRule,
    HTTPRule,
    ICMPField,
    IPNetwork,
    KafkaRule,
    L7Rules,
    LabelSelector,
    Operator,
    PeerRule,
    PortProtocol,
    PortRule,
    Protocol,
    Requirement,
    Rule,
)
from flagella.policy.api._re2 import RegexError, compile_re2

# --------------------------------------------------------------------------
# Constants of the policy language
# --------------------------------------------------------------------------

#: Label sources a selector key may name (``source:key``).
LABEL_SOURCES: Final = frozenset({"k8s", "reserved", "any", "cidr", "container", "unspec", "mesos"})

#: The pod-namespace identity label, as every selector stores it.
NAMESPACE_LABEL: Final = "k8s:io.kubernetes.pod.namespace"
_NAMESPACE_KEY: Final = "io.kubernetes.pod.namespace"
_INIT_LABEL: Final = "reserved:init"

#: Entities of modern Cilium (spec 1.4).
ENTITIES: Final = frozenset(
    {
        "all",
        "world",
        "world-ipv4",
        "world-ipv6",
        "cluster",
        "host",
        "init",
        "ingress",
        "unmanaged",
        "remote-node",
        "health",
        "none",
        "kube-apiserver",
    }
)

#: Most ports (and ICMP fields) one PortRule (ICMP rule) may list.
MAX_PORTS: Final = 40

_OPERATORS: Final[dict[str, Operator]] = {
    "in": "In",
    "notin": "NotIn",
    "exists": "Exists",
    "doesnotexist": "DoesNotExist",
}

_PROTOCOLS: Final = {
    "TCP": Protocol.TCP,
    "UDP": Protocol.UDP,
    "SCTP": Protocol.SCTP,
    "ANY": Protocol.ANY,
}

_ICMPV4_TYPES: Final = {
    "echoreply": 0,
    "destinationunreachable": 3,
    "redirect": 5,
    "echo": 8,
    "echorequest": 8,
    "routeradvertisement": 9,
    "routerselection": 10,
    "routersolicitation": 10,
    "timeexceeded": 11,
    "parameterproblem": 12,
    "timestamp": 13,
    "timestampreply": 14,
    "photuris": 40,
    "extendedechorequest": 42,
    "extendedechoreply": 43,
}

_ICMPV6_TYPES: Final = {
    "destinationunreachable": 1,
    "packettoobig": 2,
    "timeexceeded": 3,
    "parameterproblem": 4,
    "echorequest": 128,
    "echoreply": 129,
    "multicastlistenerquery": 130,
    "multicastlistenerreport": 131,
    "multicastlistenerdone": 132,
    "routersolicitation": 133,
    "routeradvertisement": 134,
    "neighborsolicitation": 135,
    "neighboradvertisement": 136,
    "redirectmessage": 137,
    "routerrenumbering": 138,
    "icmpnodeinformationquery": 139,
    "icmpnodeinformationresponse": 140,
    "inverseneighbordiscoverysolicitation": 141,
    "inverseneighbordiscoveryadvertisement": 142,
    "homeagentaddressdiscoveryrequest": 144,
    "homeagentaddressdiscoveryreply": 145,
    "mobileprefixsolicitation": 146,
    "mobileprefixadvertisement": 147,
    "duplicateaddressrequestcodesuffix": 157,
    "duplicateaddressconfirmationcodesuffix": 158,
    "extendedechorequest": 160,
    "extendedechoreply": 161,
}

_LABEL_VALUE_RE: Final = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_DNS_LABEL_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DIGITS_RE: Final = re.compile(r"[0-9]+")
_SIGNED_DIGITS_RE: Final = re.compile(r"-?[0-9]+")
_PORT_NAME_RE: Final = re.compile(r"[-a-z0-9]+")
_KAFKA_TOPIC_RE: Final = re.compile(r"[a-zA-Z0-9._-]+")
_FQDN_NAME_RE: Final = re.compile(r"([-a-zA-Z0-9_]+[.]?)+")
_FQDN_PATTERN_RE: Final = re.compile(r"([-a-zA-Z0-9_*]+[.]?)+")


# --------------------------------------------------------------------------
# Error collection and generic readers
# --------------------------------------------------------------------------


@dataclass
class Ctx:
    """Where the readers record what they found wrong with one document."""

    document: str = ""
    errors: list[FieldError] = field(default_factory=list)
    warnings: list[FieldError] = field(default_factory=list)

    def error(self, path: str, reason: str) -> None:
        self.errors.append(FieldError(path or "<document>", reason, self.document))

    def warn(self, path: str, reason: str) -> None:
        self.warnings.append(FieldError(path or "<document>", reason, self.document))


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


@dataclass(frozen=True)
class Fields:
    """The fields one kind of object may carry, in their canonical spelling.

    ``pruned`` maps further (lower-case) names to the warning given when the
    field is dropped instead of rejected.
    """

    names: tuple[str, ...]
    pruned: Mapping[str, str] = field(default_factory=dict)

    def canonical(self, key: str) -> str | None:
        low = key.lower()
        for name in self.names:
            if name.lower() == low:
                return name
        return None


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def read_object(ctx: Ctx, value: object, path: str, spec: Fields) -> dict[str, object] | None:
    """The fields of an object, keyed by canonical name; null fields are absent."""
    if not isinstance(value, Mapping):
        ctx.error(path, f"must be an object, not {type_name(value)}")
        return None
    out: dict[str, object] = {}
    spelled: dict[str, str] = {}
    for raw_key, item in value.items():
        if not isinstance(raw_key, str):
            ctx.error(join(path, str(raw_key)), "field names must be strings")
            continue
        name = spec.canonical(raw_key)
        if name is None:
            pruned = spec.pruned.get(raw_key.lower())
            if pruned is not None:
                ctx.warn(join(path, raw_key), pruned)
            else:
                ctx.error(join(path, raw_key), _unknown_field(raw_key, spec.names))
            continue
        if name in spelled:
            ctx.error(join(path, raw_key), f"duplicate field (also given as {spelled[name]!r})")
            continue
        spelled[name] = raw_key
        if item is not None:
            out[name] = item
    return out


def _unknown_field(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key.lower(), [n.lower() for n in known], n=1, cutoff=0.75)
    if close:
        suggestion = next(n for n in known if n.lower() == close[0])
        return f"unknown field (did you mean {suggestion!r}?)"
    return "unknown field"


def read_str(ctx: Ctx, value: object, path: str) -> str | None:
    if isinstance(value, str):
        return value
    ctx.error(path, f"must be a string, not {type_name(value)}")
    return None


def read_bool(ctx: Ctx, value: object, path: str) -> bool | None:
    if isinstance(value, bool):
        return value
    ctx.error(path, f"must be a boolean, not {type_name(value)}")
    return None


def read_list(ctx: Ctx, value: object, path: str) -> list[object]:
    if isinstance(value, list | tuple):
        return list(value)
    ctx.error(path, f"must be a list, not {type_name(value)}")
    return []


def read_str_list(ctx: Ctx, value: object, path: str) -> list[str]:
    out: list[str] = []
    for i, item in enumerate(read_list(ctx, value, path)):
        text = read_str(ctx, item, index(path, i))
        if text is not None:
            out.append(text)
    return out


def is_label_value(text: str) -> bool:
    return len(text) <= 63 and _LABEL_VALUE_RE.fullmatch(text) is not None


def is_label_key(key: str) -> bool:
    """A Kubernetes label key: ``[dns-subdomain/]name`` with a name of at most 63."""
    prefix, slash, name = key.rpartition("/")
    if slash and not is_dns_subdomain(prefix):
        return False
    return 0 < len(name) <= 63 and _LABEL_VALUE_RE.fullmatch(name) is not None


def is_dns_label(text: str) -> bool:
    return len(text) <= 63 and _DNS_LABEL_RE.fullmatch(text) is not None


def is_dns_subdomain(text: str) -> bool:
    return len(text) <= 253 and _DNS_SUBDOMAIN_RE.fullmatch(text) is not None


def is_port_name(text: str) -> bool:
    """Kubernetes IANA_SVC_NAME: <=15 of [-a-z0-9], a letter, no edge or double '-'."""
    return (
        0 < len(text) <= 15
        and _PORT_NAME_RE.fullmatch(text) is not None
        and any("a" <= c <= "z" for c in text)
        and not text.startswith("-")
        and not text.endswith("-")
        and "--" not in text
    )


# --------------------------------------------------------------------------
# Label selectors
# --------------------------------------------------------------------------

#: Turns a selector key as written into a source-qualified key (or None after an error).
KeyFn = Callable[[Ctx, str, str], str | None]

_SELECTOR_FIELDS: Final = Fields(("matchLabels", "matchExpressions"))
_REQUIREMENT_FIELDS: Final = Fields(("key", "operator", "values"))


def qualify_label_key(key: str, default_source: str = "any") -> str:
    """``org`` -> ``any:org``; ``k8s:app`` stays; ``$host`` -> ``reserved:host``.

    A prefix that is not a known source is part of the key. The pod namespace
    key is always ``k8s:`` (an ``any:`` match on it is the same match).
    """
    source, name = default_source, key
    if key.startswith("$"):
        source, name = "reserved", key[1:]
    elif ":" in key:
        prefix, rest = key.split(":", 1)
        if prefix in LABEL_SOURCES:
            source, name = prefix, rest
        elif prefix == "":
            name = rest
    elif key.startswith("reserved."):
        source, name = "reserved", key[len("reserved.") :]
    if name == _NAMESPACE_KEY and source in ("any", "unspec"):
        source = "k8s"
    return f"{source}:{name}"


#: Sources whose keys are not Kubernetes label keys (``reserved:host``, ``cidr:fd00::/8``).
_UNCHECKED_KEY_SOURCES: Final = frozenset({"reserved", "cidr"})


def cilium_key(ctx: Ctx, key: str, path: str) -> str | None:
    qualified = qualify_label_key(key)
    if qualified.endswith(":"):
        ctx.error(path, f"label key {key!r} has an empty name")
        return None
    source, _, name = qualified.partition(":")
    # A prefix that is not a source stays in the key (``foo:bar``): each part is checked.
    if source not in _UNCHECKED_KEY_SOURCES and not all(map(is_label_key, name.split(":"))):
        ctx.error(path, f"invalid label key {key!r}: must be [source:][DNS subdomain/]name, "
                  "the name at most 63 of [A-Za-z0-9-_.] beginning and ending alphanumeric")
        return None
    return qualified


def parse_selector(
    ctx: Ctx, value: object, path: str, key_fn: KeyFn, *, check_values: bool = False
) -> LabelSelector:
    """A LabelSelector; ``check_values`` also validates matchExpressions values."""
    fields = read_object(ctx, value, path, _SELECTOR_FIELDS)
    if fields is None:
        return LabelSelector()
    labels: dict[str, str] = {}
    written: dict[str, str] = {}
    if "matchLabels" in fields:
        ml_path = join(path, "matchLabels")
        raw_labels = fields["matchLabels"]
        if not isinstance(raw_labels, Mapping):
            ctx.error(ml_path, f"must be an object, not {type_name(raw_labels)}")
        else:
            for raw_key, raw_value in raw_labels.items():
                if not isinstance(raw_key, str):
                    ctx.error(join(ml_path, str(raw_key)), "label keys must be strings")
                    continue
                item_path = join(ml_path, raw_key)
                text = raw_value if isinstance(raw_value, str) else None
                if text is None:
                    ctx.error(
                        item_path,
                        f"label value must be a string, not {type_name(raw_value)} (quote it)",
                    )
                elif not is_label_value(text):
                    ctx.error(item_path, f"invalid label value {text!r}: at most 63 of "
                              "[A-Za-z0-9-_.], beginning and ending alphanumeric")
                key = key_fn(ctx, raw_key, item_path)
                if key is None or text is None:
                    continue
                if key in labels:
                    ctx.error(item_path, f"duplicate label key {key!r} (also given as "
                              f"{written[key]!r})")
                    continue
                labels[key] = text
                written[key] = raw_key
    expressions: list[Requirement] = []
    if "matchExpressions" in fields:
        me_path = join(path, "matchExpressions")
        for i, raw in enumerate(read_list(ctx, fields["matchExpressions"], me_path)):
            requirement = _parse_requirement(ctx, raw, index(me_path, i), key_fn, check_values)
            if requirement is not None:
                expressions.append(requirement)
    return LabelSelector(tuple(sorted(labels.items())), tuple(expressions))


def _parse_requirement(
    ctx: Ctx, value: object, path: str, key_fn: KeyFn, check_values: bool
) -> Requirement | None:
    fields = read_object(ctx, value, path, _REQUIREMENT_FIELDS)
    if fields is None:
        return None
    key: str | None = None
    if "key" not in fields:
        ctx.error(join(path, "key"), "required")
    else:
        raw_key = read_str(ctx, fields["key"], join(path, "key"))
        if raw_key is not None:
            key = key_fn(ctx, raw_key, join(path, "key"))
    operator: Operator | None = None
    if "operator" not in fields:
        ctx.error(join(path, "operator"), "required")
    else:
        raw_op = read_str(ctx, fields["operator"], join(path, "operator"))
        if raw_op is not None:
            operator = _OPERATORS.get(raw_op.lower())
            if operator is None:
                ctx.error(join(path, "operator"),
                          f"unknown operator {raw_op!r}: must be In, NotIn, Exists or DoesNotExist")
    values: list[str] = []
    if "values" in fields:
        values = read_str_list(ctx, fields["values"], join(path, "values"))
        if check_values:
            for i, text in enumerate(values):
                if not is_label_value(text):
                    ctx.error(index(join(path, "values"), i), f"invalid label value {text!r}")
    if operator in ("In", "NotIn") and not values:
        ctx.error(join(path, "values"), f"must be non-empty for operator {operator}")
    if operator in ("Exists", "DoesNotExist") and values:
        ctx.error(join(path, "values"), f"must be empty for operator {operator}")
    if key is None or operator is None:
        return None
    return Requirement(key, operator, tuple(values))


def selector_has_key(selector: LabelSelector, key: str) -> bool:
    return any(k == key for k, _ in selector.match_labels) or any(
        r.key == key for r in selector.match_expressions
    )


def selector_has_key_prefix(selector: LabelSelector, prefix: str) -> bool:
    return any(k.startswith(prefix) for k, _ in selector.match_labels) or any(
        r.key.startswith(prefix) for r in selector.match_expressions
    )


def with_match_label(selector: LabelSelector, key: str, value: str) -> LabelSelector:
    """The selector with ``key=value`` set (replacing an existing match on key)."""
    labels = dict(selector.match_labels)
    labels[key] = value
    return LabelSelector(tuple(sorted(labels.items())), selector.match_expressions)


def with_requirement(selector: LabelSelector, requirement: Requirement) -> LabelSelector:
    return LabelSelector(selector.match_labels, (*selector.match_expressions, requirement))


@dataclass(frozen=True)
class Scope:
    """How peer selectors of one rule are scoped (spec 1.6).

    ``namespace`` is the document's namespace, "" for a cluster-wide one.
    """

    namespace: str
    matches_init: bool

    def peer(self, selector: LabelSelector, *, reserved_exempt: bool) -> LabelSelector:
        if self.matches_init or selector_has_key(selector, NAMESPACE_LABEL):
            return selector
        if reserved_exempt and selector_has_key_prefix(selector, "reserved:"):
            return selector
        if not self.namespace:
            return with_requirement(selector, Requirement(NAMESPACE_LABEL, "Exists"))
        return with_match_label(selector, NAMESPACE_LABEL, self.namespace)


# --------------------------------------------------------------------------
# CIDRs
# --------------------------------------------------------------------------


def parse_cidr(ctx: Ctx, value: object, path: str, *, allow_plain_ip: bool) -> IPNetwork | None:
    """``10.0.0.0/8``; a plain address (if allowed) is a host prefix.

    A prefix with host bits set (``10.0.0.1/8``) is the network containing it.
    """
    text = read_str(ctx, value, path)
    if text is None:
        return None
    address, slash, length = text.partition("/")
    if not address or (slash and _DIGITS_RE.fullmatch(length) is None) or "%" in address:
        ctx.error(path, f"invalid CIDR {text!r}")
        return None
    if not slash and not allow_plain_ip:
        ctx.error(path, f"invalid CIDR {text!r}: must be IP/prefix-length")
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        ctx.error(path, f"invalid CIDR {text!r}: {exc}")
        return None


def check_excepts(
    ctx: Ctx, cidr: IPNetwork, excepts: list[tuple[IPNetwork, str]], *, strict_subset: bool
) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for network, path in excepts:
        if network.version != cidr.version:
            ctx.error(path, f"except {network} is not in the address family of {cidr}")
        elif not network.subnet_of(cidr):  # type: ignore[arg-type]  # same family checked
            ctx.error(path, f"except {network} is not contained in {cidr}")
        elif strict_subset and network.prefixlen <= cidr.prefixlen:
            ctx.error(path, f"except {network} must be a strict subset of {cidr}")
        else:
            out.append(network)
    return tuple(out)


# --------------------------------------------------------------------------
# Ports and L7
# --------------------------------------------------------------------------

_PORT_FIELDS: Final = Fields(("port", "endPort", "protocol"))
_PORT_RULE_FIELDS: Final = Fields(
    ("ports", "rules", "listener", "originatingTLS", "terminatingTLS", "serverNames")
)
_DENY_PORT_RULE_FIELDS: Final = Fields(("ports", "rules"))
_L7_FIELDS: Final = Fields(("http", "kafka", "dns", "l7proto", "l7"))
_HTTP_FIELDS: Final = Fields(("method", "path", "host", "headers", "headerMatches"))
_HEADER_MATCH_FIELDS: Final = Fields(("name", "value", "secret", "mismatch"))
_KAFKA_FIELDS: Final = Fields(("role", "apiKey", "apiVersion", "clientID", "topic"))
_FQDN_FIELDS: Final = Fields(("matchName", "matchPattern"))


def _parse_port(ctx: Ctx, value: object, path: str) -> PortProtocol | None:
    fields = read_object(ctx, value, path, _PORT_FIELDS)
    if fields is None:
        return None
    ok = True
    number, name = 0, ""
    port_path = join(path, "port")
    raw = fields.get("port")
    if raw is None:
        ctx.error(port_path, "must specify a port (\"0\" for every port)")
        ok = False
    elif isinstance(raw, bool) or not isinstance(raw, str | int):
        ctx.error(port_path, f"must be a string, not {type_name(raw)}")
        ok = False
    elif isinstance(raw, int):
        number = raw
    elif raw == "":
        ctx.error(port_path, "must specify a port (\"0\" for every port)")
        ok = False
    elif _DIGITS_RE.fullmatch(raw):
        number = int(raw)
    elif is_port_name(raw.lower()):
        # Cilium matches port names case-insensitively (it lower-cases them).
        name = raw.lower()
    else:
        ctx.error(port_path, f"invalid port {raw!r}: must be 0-65535 or a port name "
                  "(at most 15 of [a-z0-9-] with a letter)")
        ok = False
    if not name and not 0 <= number <= 65535:
        ctx.error(port_path, "must be 0-65535")
        ok = False

    end_port = 0
    if "endPort" in fields:
        end_path = join(path, "endPort")
        raw_end = fields["endPort"]
        if isinstance(raw_end, bool) or not isinstance(raw_end, int):
            ctx.error(end_path, f"must be an integer, not {type_name(raw_end)}")
            ok = False
        elif raw_end != 0:
            if name:
                ctx.error(end_path, "a port range needs a numeric port, not a port name")
                ok = False
            elif number == 0:
                ctx.error(end_path, "a port range needs a non-zero port")
                ok = False
            elif not number <= raw_end <= 65535:
                ctx.error(end_path, f"must be between port ({number}) and 65535")
                ok = False
            elif raw_end != number:
                end_port = raw_end

    protocol = Protocol.ANY
    if "protocol" in fields:
        proto_path = join(path, "protocol")
        raw_proto = read_str(ctx, fields["protocol"], proto_path)
        if raw_proto is None:
            ok = False
        elif raw_proto != "":
            found = _PROTOCOLS.get(raw_proto.upper())
            if found is None:
                ctx.error(proto_path, f"invalid protocol {raw_proto!r}: must be TCP, UDP, SCTP or ANY")
                ok = False
            else:
                protocol = found
    if not ok:
        return None
    return PortProtocol(port=number, protocol=protocol, end_port=end_port, name=name)


def _compile(ctx: Ctx, text: str, path: str) -> None:
    try:
        compile_re2(text)
    except RegexError as exc:
        ctx.error(path, f"not a valid RE2 regex: {exc} (pattern {text!r})")


def _parse_http(ctx: Ctx, value: object, path: str) -> HTTPRule:
    fields = read_object(ctx, value, path, _HTTP_FIELDS)
    if fields is None:
        return HTTPRule()
    regexes: dict[str, str] = {}
    for name in ("method", "path", "host"):
        if name in fields:
            text = read_str(ctx, fields[name], join(path, name))
            if text is not None:
                _compile(ctx, text, join(path, name))
                regexes[name] = text
    headers: list[str] = []
    if "headers" in fields:
        headers = read_str_list(ctx, fields["headers"], join(path, "headers"))
        for i, header in enumerate(headers):
            if not header.strip():
                ctx.error(index(join(path, "headers"), i), "empty header")
    if "headerMatches" in fields:
        hm_path = join(path, "headerMatches")
        for i, raw in enumerate(read_list(ctx, fields["headerMatches"], hm_path)):
            matched = _parse_header_match(ctx, raw, index(hm_path, i))
            if matched is not None:
                headers.append(matched)
    return HTTPRule(
        method=regexes.get("method", ""),
        path=regexes.get("path", ""),
        host=regexes.get("host", ""),
        headers=tuple(headers),
    )


def _parse_header_match(ctx: Ctx, value: object, path: str) -> str | None:
    fields = read_object(ctx, value, path, _HEADER_MATCH_FIELDS)
    if fields is None:
        return None
    name: str | None = None
    if "name" not in fields:
        ctx.error(join(path, "name"), "required")
    else:
        name = read_str(ctx, fields["name"], join(path, "name"))
        if name is not None and (not name or " " in name or ":" in name):
            ctx.error(join(path, "name"), f"invalid header name {name!r}")
            name = None
    header_value = ""
    if "value" in fields:
        header_value = read_str(ctx, fields["value"], join(path, "value")) or ""
    if "secret" in fields:
        ctx.error(join(path, "secret"), "header values from secrets are not supported")
        return None
    if "mismatch" in fields:
        action = read_str(ctx, fields["mismatch"], join(path, "mismatch"))
        if action is not None and action not in ("LOG", "ADD", "DELETE", "REPLACE"):
            ctx.error(join(path, "mismatch"), "must be LOG, ADD, DELETE or REPLACE")
        elif action is not None:
            ctx.warn(path, f"mismatch {action} does not deny a request: this header match "
                     "is not enforced")
        return None
    if name is None:
        return None
    return f"{name}: {header_value}" if header_value else name


def _parse_kafka(ctx: Ctx, value: object, path: str) -> KafkaRule:
    fields = read_object(ctx, value, path, _KAFKA_FIELDS)
    if fields is None:
        return KafkaRule()
    strings: dict[str, str] = {}
    for name in ("role", "apiKey", "clientID", "topic"):
        if name in fields:
            text = read_str(ctx, fields[name], join(path, name))
            if text is not None:
                strings[name] = text
    role, api_key = strings.get("role", ""), strings.get("apiKey", "")
    keys: frozenset[int] = frozenset()
    if role and api_key:
        ctx.error(path, "role and apiKey are mutually exclusive")
    elif role:
        role_keys = kafka_role_keys(role)
        if role_keys is None:
            ctx.error(join(path, "role"), f"invalid role {role!r}: must be produce or consume")
        else:
            keys = role_keys
    elif api_key:
        number = kafka_api_key(api_key)
        if number is None:
            ctx.error(join(path, "apiKey"), f"unknown Kafka API key {api_key!r}")
        else:
            keys = frozenset({number})

    version: int | None = None
    if "apiVersion" in fields:
        raw = fields["apiVersion"]
        version_path = join(path, "apiVersion")
        if isinstance(raw, int) and not isinstance(raw, bool):
            version = raw
        elif isinstance(raw, str) and raw == "":
            version = None
        elif isinstance(raw, str) and _SIGNED_DIGITS_RE.fullmatch(raw):
            version = int(raw)
        else:
            ctx.error(version_path, f"invalid apiVersion {raw!r}: must be a base-10 int16")
        if version is not None and not -32768 <= version <= 32767:
            ctx.error(version_path, f"invalid apiVersion {raw!r}: must be a base-10 int16")
            version = None

    topic = strings.get("topic", "")
    if len(topic) > KAFKA_MAX_TOPIC_LENGTH:
        ctx.error(join(path, "topic"), f"longer than {KAFKA_MAX_TOPIC_LENGTH} characters")
    elif topic and _KAFKA_TOPIC_RE.fullmatch(topic) is None:
        ctx.error(join(path, "topic"), f"invalid topic {topic!r}: only [a-zA-Z0-9._-]")
    return KafkaRule(
        api_keys=keys, api_version=version, client_id=strings.get("clientID", ""), topic=topic
    )


def _parse_fqdn(ctx: Ctx, value: object, path: str) -> None:
    fields = read_object(ctx, value, path, _FQDN_FIELDS)
    if fields is None:
        return
    if ("matchName" in fields) == ("matchPattern" in fields):
        ctx.error(path, "exactly one of matchName and matchPattern is required")
    for name, pattern in (("matchName", _FQDN_NAME_RE), ("matchPattern", _FQDN_PATTERN_RE)):
        if name in fields:
            text = read_str(ctx, fields[name], join(path, name))
            if text is not None and pattern.fullmatch(text) is None:
                ctx.error(join(path, name), f"invalid DNS {name[5:].lower()} {text!r}")


@dataclass(frozen=True)
class _PortRef:
    port: PortProtocol
    path: str


def _parse_l7(
    ctx: Ctx, value: object, path: str, ports: list[_PortRef], direction: SectionFields
) -> L7Rules | None:
    fields = read_object(ctx, value, path, _L7_FIELDS)
    if fields is None:
        return None
    present = [
        name
        for name in ("http", "kafka", "dns", "l7proto")
        if fields.get(name) not in ("", [], (), None)
    ]
    if len(present) > 1:
        ctx.error(path, "multiple L7 protocol rule types specified in single rule: "
                  + ", ".join(present))
        return None
    if "l7proto" in fields or "l7" in fields:
        ctx.error(join(path, "l7proto" if "l7proto" in fields else "l7"),
                  "generic L7 parsers (l7proto) are not supported")
        return None
    if "dns" in fields:
        dns_path = join(path, "dns")
        entries = read_list(ctx, fields["dns"], dns_path)
        for i, raw in enumerate(entries):
            _parse_fqdn(ctx, raw, index(dns_path, i))
        if entries and direction.name == "ingress":
            ctx.error(dns_path, "DNS rules are not allowed on ingress")
        elif entries:
            ctx.warn(dns_path, "DNS rules are not enforced: the port is allowed at L4 for "
                     "every query")
        return None

    http: tuple[HTTPRule, ...] | None = None
    kafka: tuple[KafkaRule, ...] | None = None
    if "http" in fields:
        http_path = join(path, "http")
        entries = read_list(ctx, fields["http"], http_path)
        http = tuple(_parse_http(ctx, raw, index(http_path, i)) for i, raw in enumerate(entries))
    if "kafka" in fields:
        kafka_path = join(path, "kafka")
        entries = read_list(ctx, fields["kafka"], kafka_path)
        kafka = tuple(
            _parse_kafka(ctx, raw, index(kafka_path, i)) for i, raw in enumerate(entries)
        )
    if not http and not kafka:
        return None  # an empty list of L7 rules is no L7 rule at all
    for ref in ports:
        if ref.port.protocol is not Protocol.TCP:
            ctx.error(join(ref.path, "protocol"), "L7 rules can only apply exclusively to TCP, "
                      f"not {ref.port.protocol.value}")
        elif ref.port.port == 0 and not ref.port.name:
            ctx.error(join(ref.path, "port"), "L7 rules can not be used when a port is 0")
    return L7Rules(http=http or None, kafka=kafka or None)


def _parse_port_rule(ctx: Ctx, value: object, path: str, direction: SectionFields) -> PortRule:
    spec = _DENY_PORT_RULE_FIELDS if direction.deny else _PORT_RULE_FIELDS
    fields = read_object(ctx, value, path, spec)
    if fields is None:
        return PortRule(ports=())
    refs: list[_PortRef] = []
    if "ports" in fields:
        ports_path = join(path, "ports")
        entries = read_list(ctx, fields["ports"], ports_path)
        if len(entries) > MAX_PORTS:
            ctx.error(ports_path, f"too many ports ({len(entries)}), the max is {MAX_PORTS}")
        for i, raw in enumerate(entries):
            port = _parse_port(ctx, raw, index(ports_path, i))
            if port is not None:
                refs.append(_PortRef(port, index(ports_path, i)))
    if not fields.get("ports"):
        ctx.warn(join(path, "ports"), "a port rule without ports allows nothing")
    for name in ("listener", "originatingTLS", "terminatingTLS"):
        if name in fields:
            ctx.error(join(path, name), f"{name} is not supported")
    if "serverNames" in fields:
        names = read_str_list(ctx, fields["serverNames"], join(path, "serverNames"))
        if names:
            ctx.error(join(path, "serverNames"), "serverNames (TLS SNI matching) is not supported")
    rules: L7Rules | None = None
    if "rules" in fields:
        if direction.deny:
            ctx.error(join(path, "rules"), "L7 rules are not allowed in deny rules")
        else:
            rules = _parse_l7(ctx, fields["rules"], join(path, "rules"), refs, direction)
    return PortRule(ports=tuple(r.port for r in refs), rules=rules)


_ICMP_RULE_FIELDS: Final = Fields(("fields",))
_ICMP_FIELD_FIELDS: Final = Fields(("type", "family"))


def _parse_icmp_field(ctx: Ctx, value: object, path: str) -> ICMPField | None:
    fields = read_object(ctx, value, path, _ICMP_FIELD_FIELDS)
    if fields is None:
        return None
    family: Literal["IPv4", "IPv6"] = "IPv4"
    if "family" in fields:
        raw_family = read_str(ctx, fields["family"], join(path, "family"))
        if raw_family is not None:
            if raw_family.lower() == "ipv6":
                family = "IPv6"
            elif raw_family.lower() not in ("ipv4", ""):
                ctx.error(join(path, "family"), f"invalid family {raw_family!r}: must be IPv4 or IPv6")
                return None
    type_path = join(path, "type")
    raw = fields.get("type")
    number: int | None = None
    if raw is None:
        ctx.error(type_path, "required")
    elif isinstance(raw, int) and not isinstance(raw, bool):
        number = raw
    elif isinstance(raw, str) and _DIGITS_RE.fullmatch(raw):
        number = int(raw)
    elif isinstance(raw, str):
        names = _ICMPV6_TYPES if family == "IPv6" else _ICMPV4_TYPES
        number = names.get(raw.replace(" ", "").lower())
        if number is None:
            ctx.error(type_path, f"ICMP type {raw} not found in {family}")
            return None
    else:
        ctx.error(type_path, f"must be an integer or a type name, not {type_name(raw)}")
    if number is None:
        return None
    if not 0 <= number <= 255:
        ctx.error(type_path, "must be 0-255")
        return None
    return ICMPField(type=number, family=family)


def _parse_icmps(ctx: Ctx, value: object, path: str) -> list[ICMPField]:
    out: list[ICMPField] = []
    for i, raw in enumerate(read_list(ctx, value, path)):
        rule_path = index(path, i)
        fields = read_object(ctx, raw, rule_path, _ICMP_RULE_FIELDS)
        if fields is None:
            continue
        entries = read_list(ctx, fields["fields"], join(rule_path, "fields")) if "fields" in fields else []
        if not entries:
            # No way to express "an ICMP rule that allows nothing"; dropping it
            # would turn the rule into an all-ports allow.
            ctx.error(join(rule_path, "fields"), "at least one ICMP field is required")
        if len(entries) > MAX_PORTS:
            ctx.error(join(rule_path, "fields"), f"too many ICMP fields ({len(entries)}), the max is {MAX_PORTS}")
        for j, entry in enumerate(entries):
            icmp = _parse_icmp_field(ctx, entry, index(join(rule_path, "fields"), j))
            if icmp is not None:
                out.append(icmp)
    return out


# --------------------------------------------------------------------------
# Peer rules (ingress, egress, ingressDeny, egressDeny)
# --------------------------------------------------------------------------

_CIDR_SET_FIELDS: Final = Fields(("cidr", "cidrGroupRef", "except"))
_SERVICE_FIELDS: Final = Fields(("k8sService", "k8sServiceSelector"))
_K8S_SERVICE_FIELDS: Final = Fields(("serviceName", "namespace"))
_K8S_SERVICE_SELECTOR_FIELDS: Final = Fields(("selector", "namespace"))
_GROUP_FIELDS: Final = Fields(("aws",))
_AWS_GROUP_FIELDS: Final = Fields(("labels", "region", "securityGroupsIds", "securityGroupsNames"))
_AUTHENTICATION_FIELDS: Final = Fields(("mode",))

_INGRESS_PEERS: Final = (
    "fromEndpoints", "fromRequires", "fromCIDR", "fromCIDRSet", "fromEntities", "fromGroups",
    "fromNodes",
)
_EGRESS_PEERS: Final = (
    "toEndpoints", "toRequires", "toCIDR", "toCIDRSet", "toEntities", "toGroups", "toNodes",
    "toServices", "toFQDNs",
)


@dataclass(frozen=True)
class SectionFields:
    """Field names of one section: ``ingress``, ``egress`` or their Deny forms."""

    name: Literal["ingress", "egress"]
    deny: bool
    prefix: Literal["from", "to"]
    fields: Fields

    @property
    def section(self) -> str:
        return f"{self.name}Deny" if self.deny else self.name

    def peer(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}"


def _direction(name: Literal["ingress", "egress"], deny: bool) -> SectionFields:
    own: tuple[str, ...] = _INGRESS_PEERS if name == "ingress" else _EGRESS_PEERS
    other = _EGRESS_PEERS if name == "ingress" else _INGRESS_PEERS
    if deny:
        own = tuple(f for f in own if f != "toFQDNs")
    extra = ("toPorts", "icmps") if deny else ("toPorts", "icmps", "authentication")
    section = f"{name}Deny" if deny else name
    pruned = {
        f.lower(): f"{f} is not a field of an {section} rule: ignored" for f in other
    }
    prefix: Literal["from", "to"] = "from" if name == "ingress" else "to"
    return SectionFields(name, deny, prefix, Fields((*own, *extra), pruned))


INGRESS: Final = _direction("ingress", False)
EGRESS: Final = _direction("egress", False)
INGRESS_DENY: Final = _direction("ingress", True)
EGRESS_DENY: Final = _direction("egress", True)


def _unresolvable_peer(ctx: Ctx, path: str, direction: SectionFields, what: str) -> None:
    if direction.deny:
        ctx.error(path, f"{what} cannot be enforced in a deny rule")
    else:
        ctx.warn(path, f"{what} cannot be enforced: it allows no peer")


def _parse_peer_rule(
    ctx: Ctx, value: object, path: str, direction: SectionFields, scope: Scope
) -> PeerRule:
    fields = read_object(ctx, value, path, direction.fields)
    if fields is None:
        return PeerRule()
    has_l3 = False
    selectors: list[LabelSelector] = []
    requires: list[LabelSelector] = []
    entities: list[str] = []
    cidrs: list[CIDRRule] = []

    name = direction.peer("Endpoints")
    if name in fields:
        has_l3 = True
        for i, raw in enumerate(read_list(ctx, fields[name], join(path, name))):
            selector = parse_selector(ctx, raw, index(join(path, name), i), cilium_key)
            selectors.append(scope.peer(selector, reserved_exempt=True))

    name = direction.peer("Requires")
    if name in fields:
        for i, raw in enumerate(read_list(ctx, fields[name], join(path, name))):
            selector = parse_selector(ctx, raw, index(join(path, name), i), cilium_key)
            requires.append(scope.peer(selector, reserved_exempt=False))

    name = direction.peer("Entities")
    if name in fields:
        has_l3 = True
        for i, text in enumerate(read_str_list(ctx, fields[name], join(path, name))):
            entity = text.lower()
            if entity not in ENTITIES:
                ctx.error(index(join(path, name), i), f"unsupported entity: {text}")
            else:
                entities.append(entity)

    name = direction.peer("CIDR")
    if name in fields:
        has_l3 = True
        for i, raw in enumerate(read_list(ctx, fields[name], join(path, name))):
            network = parse_cidr(ctx, raw, index(join(path, name), i), allow_plain_ip=True)
            if network is not None:
                cidrs.append(CIDRRule(network))

    name = direction.peer("CIDRSet")
    if name in fields:
        has_l3 = True
        for i, raw in enumerate(read_list(ctx, fields[name], join(path, name))):
            rule = _parse_cidr_set(ctx, raw, index(join(path, name), i), direction)
            if rule is not None:
                cidrs.append(rule)

    for suffix, what in (("Groups", "a cloud security group peer"), ("Nodes", "a node peer"),
                         ("Services", "a Kubernetes service peer"), ("FQDNs", "a DNS name peer")):
        name = direction.peer(suffix)
        if name in fields:
            has_l3 = True
            _check_unresolvable(ctx, fields[name], join(path, name), suffix)
            _unresolvable_peer(ctx, join(path, name), direction, what)

    ports: list[PortRule] = []
    if "toPorts" in fields:
        for i, raw in enumerate(read_list(ctx, fields["toPorts"], join(path, "toPorts"))):
            ports.append(_parse_port_rule(ctx, raw, index(join(path, "toPorts"), i), direction))
    icmps: list[ICMPField] = []
    if "icmps" in fields:
        icmps = _parse_icmps(ctx, fields["icmps"], join(path, "icmps"))

    if "authentication" in fields:
        _check_authentication(ctx, fields["authentication"], join(path, "authentication"))

    return PeerRule(
        selectors=tuple(selectors),
        entities=tuple(entities),
        cidrs=tuple(cidrs),
        # spec 1.6: no L3 member but an L4 member means every peer, world included.
        any_peer=not has_l3 and bool(ports or icmps),
        requires=tuple(requires),
        ports=tuple(ports),
        icmps=tuple(icmps),
    )


def _parse_cidr_set(ctx: Ctx, value: object, path: str, direction: SectionFields) -> CIDRRule | None:
    fields = read_object(ctx, value, path, _CIDR_SET_FIELDS)
    if fields is None:
        return None
    if ("cidr" in fields) == ("cidrGroupRef" in fields):
        ctx.error(path, "exactly one of cidr and cidrGroupRef is required")
        return None
    if "cidrGroupRef" in fields:
        ref = read_str(ctx, fields["cidrGroupRef"], join(path, "cidrGroupRef"))
        if ref is not None and not is_dns_subdomain(ref):
            ctx.error(join(path, "cidrGroupRef"), f"invalid CiliumCIDRGroup name {ref!r}")
        _unresolvable_peer(ctx, join(path, "cidrGroupRef"), direction, "a CIDR group reference")
        return None
    return parse_cidr_with_excepts(ctx, fields, path, plain_except=True, strict_subset=False)


def parse_cidr_with_excepts(
    ctx: Ctx, fields: Mapping[str, object], path: str, *, plain_except: bool, strict_subset: bool
) -> CIDRRule | None:
    """``cidr`` + ``except`` (CiliumNetworkPolicy CIDRSet, Kubernetes ipBlock)."""
    cidr = parse_cidr(ctx, fields["cidr"], join(path, "cidr"), allow_plain_ip=False)
    excepts: list[tuple[IPNetwork, str]] = []
    if "except" in fields:
        except_path = join(path, "except")
        for i, raw in enumerate(read_list(ctx, fields["except"], except_path)):
            network = parse_cidr(ctx, raw, index(except_path, i), allow_plain_ip=plain_except)
            if network is not None:
                excepts.append((network, index(except_path, i)))
    if cidr is None:
        return None
    return CIDRRule(cidr, check_excepts(ctx, cidr, excepts, strict_subset=strict_subset))


def _check_unresolvable(ctx: Ctx, value: object, path: str, suffix: str) -> None:
    """Validate the shape of a peer list Flagella accepts but cannot resolve."""
    for i, raw in enumerate(read_list(ctx, value, path)):
        item_path = index(path, i)
        if suffix == "Nodes":
            parse_selector(ctx, raw, item_path, cilium_key)
        elif suffix == "FQDNs":
            _parse_fqdn(ctx, raw, item_path)
        elif suffix == "Groups":
            group = read_object(ctx, raw, item_path, _GROUP_FIELDS)
            if group and "aws" in group:
                read_object(ctx, group["aws"], join(item_path, "aws"), _AWS_GROUP_FIELDS)
        else:
            service = read_object(ctx, raw, item_path, _SERVICE_FIELDS)
            if service and "k8sService" in service:
                read_object(ctx, service["k8sService"], join(item_path, "k8sService"),
                            _K8S_SERVICE_FIELDS)
            if service and "k8sServiceSelector" in service:
                sel_path = join(item_path, "k8sServiceSelector")
                by_selector = read_object(ctx, service["k8sServiceSelector"], sel_path,
                                          _K8S_SERVICE_SELECTOR_FIELDS)
                if by_selector and "selector" in by_selector:
                    parse_selector(ctx, by_selector["selector"], join(sel_path, "selector"),
                                   cilium_key)


def _check_authentication(ctx: Ctx, value: object, path: str) -> None:
    fields = read_object(ctx, value, path, _AUTHENTICATION_FIELDS)
    if fields is None:
        return
    if "mode" not in fields:
        ctx.error(join(path, "mode"), "required")
        return
    mode = read_str(ctx, fields["mode"], join(path, "mode"))
    if mode is None:
        return
    if mode not in ("disabled", "required", "test-always-fail"):
        ctx.error(join(path, "mode"), "must be disabled, required or test-always-fail")
    elif mode != "disabled":
        ctx.error(join(path, "mode"), f"authentication mode {mode!r} is not supported")


# --------------------------------------------------------------------------
# Rules and documents
# --------------------------------------------------------------------------

_RULE_FIELDS: Final = Fields(
    (
        "endpointSelector", "nodeSelector", "ingress", "ingressDeny", "egress", "egressDeny",
        "labels", "description", "enableDefaultDeny",
    )
)
_DEFAULT_DENY_FIELDS: Final = Fields(("ingress", "egress"))
_RULE_LABEL_FIELDS: Final = Fields(("key", "value", "source"))
_CILIUM_DOCUMENT_FIELDS: Final = Fields(
    ("apiVersion", "kind", "metadata", "spec", "specs", "status", "description")
)
_METADATA_NAME_FIELDS: Final = ("name", "namespace", "uid")

CiliumKind = Literal["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]


@dataclass(frozen=True)
class Metadata:
    name: str
    namespace: str  # "" for a cluster-wide document
    uid: str


def parse_metadata(ctx: Ctx, value: object, *, namespaced: bool) -> Metadata:
    """name, namespace (default "default") and uid; other ObjectMeta fields pass."""
    path = "metadata"
    if value is None:
        ctx.error(path, "required")
        return Metadata("", "default" if namespaced else "", "")
    if not isinstance(value, Mapping):
        ctx.error(path, f"must be an object, not {type_name(value)}")
        return Metadata("", "default" if namespaced else "", "")
    found: dict[str, str] = {}
    for raw_key, raw in value.items():
        if not isinstance(raw_key, str):
            ctx.error(join(path, str(raw_key)), "field names must be strings")
            continue
        key = raw_key.lower()
        if key in _METADATA_NAME_FIELDS and raw is not None:
            text = read_str(ctx, raw, join(path, key))
            if text is not None:
                found[key] = text
    name = found.get("name", "")
    if not name:
        ctx.error(join(path, "name"), "required: a policy must have a name")
    elif not is_dns_subdomain(name):
        ctx.error(join(path, "name"), f"invalid name {name!r}: must be a DNS subdomain "
                  "(lower-case alphanumerics, '-' and '.')")
    namespace = found.get("namespace", "")
    if not namespaced:
        if namespace:
            ctx.warn(join(path, "namespace"), "a cluster-wide policy has no namespace: ignored")
        namespace = ""
    elif not namespace:
        namespace = "default"
    elif not is_dns_label(namespace):
        ctx.error(join(path, "namespace"), f"invalid namespace {namespace!r}: must be a DNS label")
    return Metadata(name, namespace, found.get("uid", ""))


def policy_labels(kind: str, meta: Metadata) -> list[str]:
    """Rule-origin labels, sorted by key as Cilium writes them."""
    labels = [
        f"k8s:io.cilium.k8s.policy.derived-from={kind}",
        f"k8s:io.cilium.k8s.policy.name={meta.name}",
    ]
    if meta.namespace:
        labels.append(f"k8s:io.cilium.k8s.policy.namespace={meta.namespace}")
    if meta.uid:
        labels.append(f"k8s:io.cilium.k8s.policy.uid={meta.uid}")
    return labels


def _parse_rule_label(ctx: Ctx, value: object, path: str) -> str | None:
    if isinstance(value, str):
        key, _, label_value = value.partition("=")
        qualified = qualify_label_key(key, default_source="unspec")
        if qualified.endswith(":"):
            ctx.error(path, f"invalid label {value!r}: empty key")
            return None
        return f"{qualified}={label_value}"
    fields = read_object(ctx, value, path, _RULE_LABEL_FIELDS)
    if fields is None:
        return None
    texts: dict[str, str] = {}
    for name in ("key", "value", "source"):
        if name in fields:
            text = read_str(ctx, fields[name], join(path, name))
            if text is not None:
                texts[name] = text
    if not texts.get("key"):
        if "key" not in fields:
            ctx.error(join(path, "key"), "required")
        elif "key" in texts:
            ctx.error(join(path, "key"), "must not be empty")
        return None
    return f"{texts.get('source') or 'unspec'}:{texts['key']}={texts.get('value', '')}"


def _parse_section(
    ctx: Ctx, value: object, path: str, direction: SectionFields, scope: Scope
) -> tuple[PeerRule, ...]:
    return tuple(
        _parse_peer_rule(ctx, raw, index(path, i), direction, scope)
        for i, raw in enumerate(read_list(ctx, value, path))
    )


def parse_cilium_rule(
    ctx: Ctx, value: object, path: str, namespace: str, origin: list[str]
) -> Rule | None:
    """One ``api.Rule`` of a CNP (``namespace`` set) or CCNP (``namespace`` "")."""
    fields = read_object(ctx, value, path, _RULE_FIELDS)
    if fields is None:
        return None
    if "nodeSelector" in fields:
        ctx.error(join(path, "nodeSelector"), "nodeSelector (host policies) is not supported")
    selector = LabelSelector()
    if "endpointSelector" in fields:
        selector = parse_selector(ctx, fields["endpointSelector"], join(path, "endpointSelector"),
                                  cilium_key)
    elif "nodeSelector" not in fields:
        ctx.error(join(path, "endpointSelector"), "required: a rule must have an endpointSelector")
    matches_init = selector_has_key(selector, _INIT_LABEL)
    if namespace and not matches_init:
        given = dict(selector.match_labels).get(NAMESPACE_LABEL)
        if given is not None and given != namespace:
            ctx.warn(join(path, "endpointSelector"), f"namespace {given!r} replaced by the "
                     f"policy's namespace {namespace!r}")
        selector = with_match_label(selector, NAMESPACE_LABEL, namespace)
    scope = Scope(namespace, matches_init)

    sections: dict[str, tuple[PeerRule, ...] | None] = {}
    for direction in (INGRESS, INGRESS_DENY, EGRESS, EGRESS_DENY):
        name = direction.section
        sections[name] = (
            _parse_section(ctx, fields[name], join(path, name), direction, scope)
            if name in fields
            else None
        )

    default_deny: dict[str, bool | None] = {"ingress": None, "egress": None}
    if "enableDefaultDeny" in fields:
        dd_path = join(path, "enableDefaultDeny")
        dd = read_object(ctx, fields["enableDefaultDeny"], dd_path, _DEFAULT_DENY_FIELDS)
        for name in ("ingress", "egress"):
            if dd and name in dd:
                default_deny[name] = read_bool(ctx, dd[name], join(dd_path, name))

    labels = list(origin)
    if "labels" in fields:
        labels_path = join(path, "labels")
        for i, raw in enumerate(read_list(ctx, fields["labels"], labels_path)):
            label = _parse_rule_label(ctx, raw, index(labels_path, i))
            if label is not None:
                labels.append(label)

    description = ""
    if "description" in fields:
        description = read_str(ctx, fields["description"], join(path, "description")) or ""

    return Rule(
        endpoint_selector=selector,
        ingress=sections["ingress"],
        egress=sections["egress"],
        ingress_deny=sections["ingressDeny"],
        egress_deny=sections["egressDeny"],
        labels=tuple(labels),
        description=description,
        default_deny_ingress=default_deny["ingress"],
        default_deny_egress=default_deny["egress"],
    )


def parse_cilium_policy(
    ctx: Ctx, obj: Mapping[str, object], kind: CiliumKind
) -> tuple[Metadata, tuple[Rule, ...]]:
    """A whole CNP/CCNP document: envelope, then ``spec`` and ``specs`` in order."""
    fields = read_object(ctx, obj, "", _CILIUM_DOCUMENT_FIELDS) or {}
    if "apiVersion" in fields:
        api_version = read_str(ctx, fields["apiVersion"], "apiVersion")
        if api_version is not None and api_version != "cilium.io/v2":
            ctx.error("apiVersion", f"unsupported apiVersion {api_version!r} for {kind}: "
                      "must be cilium.io/v2")
    meta = parse_metadata(ctx, fields.get("metadata"), namespaced=kind == "CiliumNetworkPolicy")
    origin = policy_labels(kind, meta)
    rules: list[Rule] = []
    given = False
    if "spec" in fields:
        given = True
        rule = parse_cilium_rule(ctx, fields["spec"], "spec", meta.namespace, origin)
        if rule is not None:
            rules.append(rule)
    if "specs" in fields:
        entries = read_list(ctx, fields["specs"], "specs")
        given = given or bool(entries)
        for i, raw in enumerate(entries):
            rule = parse_cilium_rule(ctx, raw, index("specs", i), meta.namespace, origin)
            if rule is not None:
                rules.append(rule)
    if not given:
        ctx.error("spec", f"required: a {kind} must have spec or a non-empty specs")
    return meta, tuple(rules)
