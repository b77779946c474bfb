"""Policy text and files -> `Policy` objects, all or nothing.

Theory of operation
-------------------
Text is decoded as JSON when it looks like JSON and parses as such, else as
YAML (multi-document). A document is a policy object, a ``kind: List`` (or a
typed ``<Kind>List``) holding ``items``, or a top-level list of policies;
empty documents are skipped. Each policy object is dispatched on its
``kind`` to the CNP/CCNP parser (`_parse`), the NetworkPolicy translator
(`_k8s`) or the ClusterNetworkPolicy translator (`_clusternetworkpolicy`).

Every document is parsed even after an error, and every error of every
document is reported in one `PolicyValidationError`; if there is any, no
policy is returned. Each error names its document, e.g.
``policies.yaml#2 (CiliumNetworkPolicy default/rule1)``; items of a list
are ``#1.items[0]`` (``kind: List``) or ``#1[0]`` (top-level list).

Warnings (fields accepted but ignored, features that cannot be enforced)
never fail a load; callers that want them pass a list to collect them.

This module is the only one of `flagella.policy.api` that reads files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import yaml

from flagella.errors import FieldError, PolicyValidationError
from flagella.policy.api._clusternetworkpolicy import parse_cluster_network_policy
from flagella.policy.api._k8s import parse_network_policy
from flagella.policy.api._model import Policy, PolicyKind
from flagella.policy.api._parse import Ctx, Metadata, parse_cilium_policy

_CILIUM_KINDS: Final = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
_KINDS: Final[tuple[PolicyKind, ...]] = (*_CILIUM_KINDS, "NetworkPolicy", "ClusterNetworkPolicy")
_NAMESPACED: Final = ("CiliumNetworkPolicy", "NetworkPolicy")
_UNSUPPORTED_KINDS: Final = {
    "AdminNetworkPolicy": "AdminNetworkPolicy is not supported: use its successor "
    "ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) with tier Admin",
    "BaselineAdminNetworkPolicy": "BaselineAdminNetworkPolicy is not supported: use its "
    "successor ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) with tier Baseline",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that leaves timestamps as strings, so documents stay JSON-compatible."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_policy(
    obj: Mapping[str, object], document: str = "", *, warnings: list[FieldError] | None = None
) -> Policy:
    """One policy object (a parsed document) -> its `Policy`.

    Raises `PolicyValidationError` with every problem found. ``document``
    prefixes each error's document label (e.g. ``file.yaml#2``).
    """
    errors: list[FieldError] = []
    policy = _parse_object(obj, document, errors, warnings)
    if errors or policy is None:
        raise PolicyValidationError(errors)
    return policy


def load_policies(
    text: str, source: str = "<input>", *, warnings: list[FieldError] | None = None
) -> list[Policy]:
    """Every policy of a YAML or JSON text, or `PolicyValidationError` listing every error."""
    errors: list[FieldError] = []
    policies = _load_text(text, source, errors, warnings)
    if errors:
        raise PolicyValidationError(errors)
    _warn_duplicates(policies, warnings)
    return policies


def load_policy_files(
    paths: Sequence[str | Path], *, warnings: list[FieldError] | None = None
) -> list[Policy]:
    """Every policy of every file, all or nothing (as `load_policies`)."""
    errors: list[FieldError] = []
    policies: list[Policy] = []
    for path in paths:
        label = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            errors.append(FieldError("<file>", f"cannot read: {exc.strerror or exc}", label))
            continue
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            errors.append(FieldError("<file>", f"not UTF-8 text: {exc.reason} at byte {exc.start}",
                                     label))
            continue
        policies.extend(_load_text(text, label, errors, warnings))
    if errors:
        raise PolicyValidationError(errors)
    _warn_duplicates(policies, warnings)
    return policies


def _load_text(
    text: str, source: str, errors: list[FieldError], warnings: list[FieldError] | None
) -> list[Policy]:
    policies: list[Policy] = []
    for number, document in _documents(text.lstrip("\ufeff"), source, errors):
        for obj, label in _expand(document, f"{source}#{number}", errors):
            policy = _parse_object(obj, label, errors, warnings)
            if policy is not None:
                policies.append(policy)
    return policies


def _documents(text: str, source: str, errors: list[FieldError]) -> Iterator[tuple[int, object]]:
    """(1-based number, document) of each non-empty document; a syntax error ends the text."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            yield 1, json.loads(text)
            return
        except (ValueError, RecursionError):
            pass  # YAML flow style, or broken: YAML will say where
    number = 0
    try:
        for number, document in enumerate(yaml.load_all(text, Loader=_Loader), start=1):
            if document is not None:
                yield number, document
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<yaml>"
        problem = exc.problem or exc.context or "invalid YAML"
        errors.append(FieldError(where, f"invalid YAML: {problem}", f"{source}#{number + 1}"))
    except RecursionError:
        errors.append(FieldError("<yaml>", "invalid YAML: nested too deeply",
                                 f"{source}#{number + 1}"))
    except Exception as exc:  # PyYAML raises assorted errors on odd input
        errors.append(FieldError("<yaml>", f"invalid YAML: {exc}", f"{source}#{number + 1}"))


def _expand(document: object, label: str, errors: list[FieldError]) -> Iterator[tuple[object, str]]:
    """The policy objects of one document: itself, its List items, or its list elements."""
    if isinstance(document, list | tuple):
        for i, item in enumerate(document):
            if item is not None:
                yield item, f"{label}[{i}]"
        return
    if isinstance(document, Mapping):
        kind = _lookup(document, "kind")
        if isinstance(kind, str) and kind.endswith("List") and kind not in _KINDS:
            yield from _list_items(document, kind, label, errors)
            return
    yield document, label


def _list_items(
    document: Mapping[object, object], kind: str, label: str, errors: list[FieldError]
) -> Iterator[tuple[object, str]]:
    item_kind = kind[: -len("List")]
    if item_kind and item_kind not in _KINDS:
        errors.append(FieldError("kind", f"unsupported list kind {kind!r}", label))
        return
    items = _lookup(document, "items")
    if items is None:
        return
    if not isinstance(items, list | tuple):
        errors.append(FieldError("items", "must be a list", label))
        return
    api_version = _lookup(document, "apiVersion")
    for i, item in enumerate(items):
        if item is None:
            continue
        if item_kind and isinstance(item, Mapping) and _lookup(item, "kind") is None:
            # Items of a typed list (as the API server returns them) may omit kind.
            defaults: dict[str, object] = {"kind": item_kind}
            if isinstance(api_version, str) and _lookup(item, "apiVersion") is None:
                defaults["apiVersion"] = api_version
            item = {**defaults, **item}
        yield item, f"{label}.items[{i}]"


def _parse_object(
    obj: object, document: str, errors: list[FieldError], warnings: list[FieldError] | None
) -> Policy | None:
    ctx = Ctx(_describe(obj, document))
    policy = _dispatch(ctx, obj)
    errors.extend(ctx.errors)
    if warnings is not None:
        warnings.extend(ctx.warnings)
    return None if ctx.errors else policy


def _dispatch(ctx: Ctx, obj: object) -> Policy | None:
    if not isinstance(obj, Mapping):
        ctx.error("<document>", "a policy document must be an object")
        return None
    plain = _Plainer(ctx).document(obj)
    if plain is None:
        return None
    kind = _lookup(plain, "kind")
    meta: Metadata
    if kind is None:
        ctx.error("kind", "required")
        return None
    if kind == "CiliumNetworkPolicy" or kind == "CiliumClusterwideNetworkPolicy":
        meta, rules = parse_cilium_policy(ctx, plain, kind)
    elif kind == "NetworkPolicy":
        meta, rules = parse_network_policy(ctx, plain)
    elif kind == "ClusterNetworkPolicy":
        parsed = parse_cluster_network_policy(ctx, plain)
        if parsed is None:
            return None
        meta, rules = parsed
    elif isinstance(kind, str) and kind in _UNSUPPORTED_KINDS:
        ctx.error("kind", _UNSUPPORTED_KINDS[kind])
        return None
    else:
        ctx.error("kind", f"unsupported kind {kind!r}: must be one of {', '.join(_KINDS)}")
        return None
    return Policy(kind=kind, name=meta.name, namespace=meta.namespace, rules=rules, source=plain)


class _Plainer:
    """Copies a document into plain JSON types, within a size budget.

    Keys become strings as ``kubectl`` makes them (``80:`` -> ``"80"``). The
    budget counts every value as often as YAML aliases repeat it, so a small
    text cannot expand into an unbounded amount of parsing work.
    """

    MAX_VALUES: Final = 100_000
    MAX_DEPTH: Final = 100

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.budget = self.MAX_VALUES
        self.failed = False

    def document(self, obj: Mapping[object, object] | Mapping[str, object]) -> dict[str, object] | None:
        plain = self._mapping(obj, "", 0)
        return None if self.failed else plain

    def _mapping(
        self, obj: Mapping[object, object] | Mapping[str, object], path: str, depth: int
    ) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in obj.items():
            name = _key_text(key)
            if name in out and not isinstance(key, str):
                self._fail(_join(path, name), "duplicate field")
            out[name] = self._value(value, _join(path, name), depth + 1)
        return out

    def _value(self, value: object, path: str, depth: int) -> object:
        if self.failed:
            return None
        self.budget -= 1
        if self.budget < 0:
            self._fail("<document>", f"too large: more than {self.MAX_VALUES} values "
                       "(YAML aliases count each time they are used)")
            return None
        if depth > self.MAX_DEPTH:
            self._fail(path, f"nested more than {self.MAX_DEPTH} levels deep")
            return None
        if isinstance(value, Mapping):
            return self._mapping(value, path, depth)
        if isinstance(value, list | tuple):
            return [self._value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
        if value is None or isinstance(value, str | int | float | bool):
            return value
        self._fail(path, f"unsupported value of type {type(value).__name__}")
        return None

    def _fail(self, path: str, reason: str) -> None:
        self.ctx.error(path, reason)
        self.failed = True


def _key_text(key: object) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    return str(key)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _lookup(obj: Mapping[object, object] | Mapping[str, object], key: str) -> object:
    """A top-level field, matched case-insensitively (None if absent)."""
    for raw_key, value in obj.items():
        if isinstance(raw_key, str) and raw_key.lower() == key.lower():
            return value
    return None


def _describe(obj: object, document: str) -> str:
    """``document (Kind namespace/name)``, from whatever the object has."""
    if not isinstance(obj, Mapping):
        return document
    kind = _lookup(obj, "kind")
    kind_text = kind if isinstance(kind, str) and kind else "<no kind>"
    meta = _lookup(obj, "metadata")
    name = namespace = None
    if isinstance(meta, Mapping):
        name, namespace = _lookup(meta, "name"), _lookup(meta, "namespace")
    name_text = name if isinstance(name, str) and name else "<no name>"
    if kind_text in _NAMESPACED:
        ns_text = namespace if isinstance(namespace, str) and namespace else "default"
        name_text = f"{ns_text}/{name_text}"
    described = f"{kind_text} {name_text}"
    return f"{document} ({described})" if document else described


def _warn_duplicates(policies: list[Policy], warnings: list[FieldError] | None) -> None:
    if warnings is None:
        return
    seen: set[tuple[str, str, str]] = set()
    for policy in policies:
        if policy.key in seen:
            kind, namespace, name = policy.key
            where = f"{namespace}/{name}" if namespace else name
            warnings.append(FieldError("metadata.name", f"{kind} {where} is given more than once; "
                                       "the last one wins"))
        seen.add(policy.key)
