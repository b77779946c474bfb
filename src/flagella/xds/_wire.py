"""Protobuf wire encoding for the few envelope fields we build by hand.

The xDS responses are an envelope (version, type URL, nonce) around resources
that are already serialized. Writing the envelope by hand lets every stream
send the cached resource bytes as they are, with no re-encoding per stream.
"""

from __future__ import annotations

_LEN = 2


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or sub-message)."""
    return varint((number << 3) | _LEN) + varint(len(payload)) + payload


def field_str(number: int, text: str) -> bytes:
    return field_bytes(number, text.encode()) if text else b""
