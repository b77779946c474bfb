"""Policy documents in, typed Cilium-form rules out (see `_model`)."""

from flagella.policy.api._kafka import KAFKA_API_KEYS, KAFKA_ROLES
from flagella.policy.api._load import load_policies, load_policy_files, parse_policy
from flagella.policy.api._model import (
    PROTOCOL_NAMES,
    CIDRRule,
    HTTPRule,
    ICMPField,
    KafkaRule,
    L7Rules,
    LabelSelector,
    PeerRule,
    Policy,
    PortProtocol,
    PortRule,
    Protocol,
    Requirement,
    Rule,
    Tier,
)
from flagella.policy.api._re2 import RE2_MAX_PROGRAM_SIZE, RegexError, full_match

__all__ = [
    "PROTOCOL_NAMES",
    "RE2_MAX_PROGRAM_SIZE",
    "RegexError",
    "full_match",
    "KAFKA_API_KEYS",
    "KAFKA_ROLES",
    "CIDRRule",
    "HTTPRule",
    "ICMPField",
    "KafkaRule",
    "L7Rules",
    "LabelSelector",
    "PeerRule",
    "Policy",
    "PortProtocol",
    "PortRule",
    "Protocol",
    "Requirement",
    "Rule",
    "Tier",
    "load_policies",
    "load_policy_files",
    "parse_policy",
]
