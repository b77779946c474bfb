"""Kafka names the policy language knows (spec 4.1, 4.2).

``apiKey`` and ``role`` are matched case-insensitively; both tables use the
lower-case spelling. Keys 34-37 exist on the wire but have no policy name
(Cilium's ``KafkaAPIKeyMap`` stops at 33), so a policy cannot name them.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

#: Policy name of each Kafka API key -> its number.
KAFKA_API_KEYS: Final[dict[str, int]] = {
    "produce": 0,
    "fetch": 1,
    "offsets": 2,
    "metadata": 3,
    "leaderandisr": 4,
    "stopreplica": 5,
    "updatemetadata": 6,
    "controlledshutdown": 7,
    "offsetcommit": 8,
    "offsetfetch": 9,
    "findcoordinator": 10,
    "joingroup": 11,
    "heartbeat": 12,
    "leavegroup": 13,
    "syncgroup": 14,
    "describegroups": 15,
    "listgroups": 16,
    "saslhandshake": 17,
    "apiversions": 18,
    "createtopics": 19,
    "deletetopics": 20,
    "deleterecords": 21,
    "initproducerid": 22,
    "offsetforleaderepoch": 23,
    "addpartitionstotxn": 24,
    "addoffsetstotxn": 25,
    "endtxn": 26,
    "writetxnmarkers": 27,
    "txnoffsetcommit": 28,
    "describeacls": 29,
    "createacls": 30,
    "deleteacls": 31,
    "describeconfigs": 32,
    "alterconfigs": 33,
}

#: Each role -> the API keys it allows (spec 4.2).
KAFKA_ROLES: Final[MappingProxyType[str, frozenset[int]]] = MappingProxyType(
    {
        "produce": frozenset({0, 3, 18}),
        "consume": frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}),
    }
)

#: Largest topic name the policy language accepts (Kafka itself stops at 249).
KAFKA_MAX_TOPIC_LENGTH: Final = 255


def kafka_api_key(name: str) -> int | None:
    """The number of a Kafka API key named in policy, or None if unknown."""
    return KAFKA_API_KEYS.get(name.lower())


def kafka_role_keys(role: str) -> frozenset[int] | None:
    """The API keys a role allows, or None if the role is unknown."""
    return KAFKA_ROLES.get(role.lower())
