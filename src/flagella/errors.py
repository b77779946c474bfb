"""Flagella's error taxonomy.

Library code raises these and nothing broader; foreign errors (netlink, bcc,
sqlite, YAML) are translated where they enter. The CLI maps `InputError`
to exit status 2.
"""

from __future__ import annotations

from dataclasses import dataclass


class FlagellaError(Exception):
    """Base of every error Flagella raises on purpose."""


class InputError(FlagellaError):
    """The user gave something invalid: a policy, a label, a flag."""


@dataclass(frozen=True)
class FieldError:
    """One rejected field: ``path`` like ``specs[0].ingress[1].toPorts[0].ports[0].port``."""

    path: str
    reason: str
    document: str = ""  # e.g. "policies.yaml#2 (CiliumNetworkPolicy default/rule1)"

    def __str__(self) -> str:
        where = f"{self.document}: " if self.document else ""
        return f"{where}{self.path}: {self.reason}"


class PolicyValidationError(InputError):
    """A set of documents failed validation; nothing of it was imported."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class ResolutionError(FlagellaError):
    """Policy that parsed cannot be resolved for an endpoint (e.g. conflicting L7 parsers)."""


class DatapathError(FlagellaError):
    """The kernel refused something: a map update, a program load, a link change."""


class AgentUnavailable(FlagellaError):
    """The CLI could not reach the agent."""
