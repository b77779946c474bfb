"""The plugin process: read the invocation, ask the agent, print the result or the error.

`run` is the whole plugin with its I/O passed in (environment, stdin bytes, and the agent
call), so tests drive it in process as well as through the ``flagella-cni`` executable.
Every failure becomes the spec's error object on stdout and exit status 1; nothing raises
out of `run`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from flagella import rpc
from flagella.client import call as agent_call
from flagella.cni._spec import (
    AGENT_FAILED,
    AGENT_REFUSED,
    INVALID_CONFIG,
    IO_FAILURE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CniError,
    Invocation,
    add_result,
    check_prev_result,
    error_result,
    parse_invocation,
    version_result,
)
from flagella.errors import AgentUnavailable, InputError

__all__ = ["AgentCall", "main", "run"]

#: (socket path or None, method, params, timeout seconds) -> the agent's result.
AgentCall = Callable[[str | None, str, dict[str, Any], float], Any]
#: STATUS: "the plugin is not available" (spec 1.1.0).
PLUGIN_NOT_AVAILABLE = 50


def _ask(call: AgentCall, inv: Invocation, method: str, params: dict[str, Any]) -> Any:
    assert inv.conf is not None
    try:
        return call(inv.conf.socket, method, params, inv.conf.timeout_s)
    except AgentUnavailable as exc:
        raise CniError(TRY_AGAIN_LATER, "the flagella agent is not reachable", str(exc)) from None
    except InputError as exc:
        raise CniError(AGENT_REFUSED, f"the flagella agent refused {method}", str(exc)) from None
    except rpc.AgentError as exc:
        raise CniError(AGENT_FAILED, f"the flagella agent failed {method}", str(exc)) from None


def _attachment(inv: Invocation) -> dict[str, Any]:
    namespace, name = inv.pod
    return {
        "container_id": inv.container_id, "netns": inv.netns, "ifname": inv.ifname,
        "pod_namespace": namespace, "pod_name": name,
    }


def _dispatch(inv: Invocation, call: AgentCall) -> dict[str, Any] | None:
    assert inv.command == "VERSION" or inv.conf is not None
    if inv.command == "VERSION":
        return version_result(inv)
    assert inv.conf is not None
    if inv.command == "ADD":
        answer = _ask(call, inv, "cni.add", {**_attachment(inv), "mtu": inv.conf.mtu or 0})
        return add_result(inv, answer)
    if inv.command == "DEL":
        _ask(call, inv, "cni.del", _attachment(inv))
        return None
    if inv.command == "CHECK":
        answer = _ask(call, inv, "cni.check", _attachment(inv))
        if not answer.get("found"):
            raise CniError(UNKNOWN_CONTAINER, f"container {inv.container_id} has no flagella attachment")
        if answer.get("problems"):
            raise CniError(AGENT_REFUSED, "the attachment is not as expected", "; ".join(answer["problems"]))
        check_prev_result(inv, answer)
        return None
    if inv.command == "GC":
        if inv.conf.valid_attachments is None:
            raise CniError(
                INVALID_CONFIG, "invalid network configuration: cni.dev/valid-attachments: required for GC",
                "cni.dev/valid-attachments",
            )
        _ask(call, inv, "cni.gc", {"valid": list(inv.conf.valid_attachments)})
        return None
    # STATUS: ready when the agent answers.
    try:
        _ask(call, inv, "status", {})
    except CniError as exc:
        raise CniError(PLUGIN_NOT_AVAILABLE, "the flagella agent is not ready", exc.details) from None
    return None


def run(env: Mapping[str, str], stdin: bytes, call: AgentCall = agent_call) -> tuple[int, bytes]:
    """One run of the plugin: (exit status, stdout bytes)."""
    version: str | None = None
    try:
        inv = parse_invocation(env, stdin)
        version = inv.conf.cni_version if inv.conf else None
        result = _dispatch(inv, call)
    except CniError as exc:
        return 1, _json(error_result(version, exc))
    except Exception as exc:  # a bug: still the spec's error object, never a traceback alone
        return 1, _json(error_result(version, CniError(AGENT_FAILED, "flagella-cni failed", repr(exc))))
    return 0, _json(result) if result is not None else b""


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"


def main() -> None:
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as exc:
        code, out = 1, _json(error_result(None, CniError(IO_FAILURE, "cannot read stdin", str(exc))))
    else:
        code, out = run(os.environ, stdin)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.exit(code)
