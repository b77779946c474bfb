"""The agent API's wire format: JSON lines over a unix socket.

A request is one line ``{"method": "endpoint.create", "params": {...}}``.
The answer is one line ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "...", "kind": "input" | "agent"}``. A streaming
method (``monitor``) answers with one line per event until the client
closes the connection.

Decoding is strict, because the other end may be hostile: a line is UTF-8
JSON nested at most `MAX_DEPTH` deep, its integers fit in 64 bits, its floats
are finite (no ``NaN``/``Infinity``), and its strings are valid Unicode (no
lone surrogates). Anything else is an `InputError` that names the problem,
never a crash of whoever reads the value later. The size of a line is the
reader's business (the agent's ``api.max_request_bytes``; `MAX_ANSWER` for
clients).
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from flagella.errors import FlagellaError, InputError

#: Largest answer line a client reads.
MAX_ANSWER: Final = 256 * 1024 * 1024
#: Deepest nesting of arrays and objects a line may have (a policy document needs ~12).
MAX_DEPTH: Final = 64
#: Integers must fit in 64 bits (signed or unsigned).
INT_RANGE: Final = (-(1 << 63), (1 << 64) - 1)


class AgentError(FlagellaError):
    """The agent ran the request and reported a failure that is not the user's input."""


def encode(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _parse_int(text: str) -> int:
    if len(text) > 21:  # 2**64 has 20 digits; a sign makes 21
        raise InputError(f"request: integer {text[:24]}... is out of range (64 bits at most)")
    value = int(text)
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise InputError(f"request: integer {text} is out of range (64 bits at most)")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"request: number {text[:24]} is out of range")
    return value


def _reject_constant(text: str) -> Any:
    raise InputError(f"request: {text} is not a JSON number")


def _check(obj: Any) -> None:
    """Depth and string validity, iteratively (a recursive walk is what we are guarding)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (list, dict)):
            if depth > MAX_DEPTH:
                raise InputError(f"request: nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("request: string contains a lone surrogate (not Unicode text)") from None


def decode(line: bytes) -> Any:
    """One line of JSON, checked as the module docstring says."""
    try:
        obj = json.loads(
            line, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise InputError(f"request is not JSON: {exc.msg} (at byte {exc.pos})") from None
    except UnicodeDecodeError:
        raise InputError("request is not UTF-8 JSON") from None
    except RecursionError:
        raise InputError(f"request: nested deeper than {MAX_DEPTH} levels") from None
    _check(obj)
    return obj


def ok(result: Any) -> bytes:
    return encode({"ok": True, "result": result})


def error(exc: BaseException) -> bytes:
    kind = "input" if isinstance(exc, InputError) else "agent"
    return encode({"ok": False, "error": str(exc), "kind": kind})


def unwrap(answer: Any) -> Any:
    if not isinstance(answer, dict) or "ok" not in answer:
        raise AgentError("malformed answer from agent")
    if answer["ok"]:
        return answer.get("result")
    if answer.get("kind") == "input":
        raise InputError(str(answer.get("error")))
    raise AgentError(str(answer.get("error")))
