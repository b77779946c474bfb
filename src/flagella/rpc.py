"""The agent API's wire format: JSON lines over a unix socket.

A request is one line ``{"method": "endpoint.create", "params": {...}}``.
The answer is one line ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "...", "kind": "input" | "agent"}``. A streaming
method (``monitor``) answers with one line per event until the client
closes the connection.
"""

from __future__ import annotations

import json
from typing import Any

from flagella.errors import FlagellaError, InputError

MAX_LINE = 64 * 1024 * 1024


class AgentError(FlagellaError):
    """The agent ran the request and reported a failure that is not the user's input."""


def encode(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"request is not JSON: {exc.msg}") from None
    except UnicodeDecodeError:
        raise InputError("request is not UTF-8 JSON") from None


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
