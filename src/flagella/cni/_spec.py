"""The CNI protocol, without I/O: invocations in, results and errors out (spec 1.0.0; GC
and STATUS from 1.1.0).

Theory of operation
-------------------
A runtime runs the plugin with the command and the attachment in environment variables
(``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS``,
``CNI_PATH``) and the network configuration as JSON on stdin. `parse_invocation` checks
both and returns an `Invocation`, or raises `CniError` with the spec's code and a message
that names the variable or field:

* 1: a ``cniVersion`` the plugin does not speak;
* 4: a missing or malformed environment variable;
* 6: stdin that is not JSON at all;
* 7: a configuration field with the wrong type or value.

`add_result` builds the ADD result (``interfaces``, ``ips``, ``routes``, ``dns``) from the
agent's answer; `check_prev_result` compares a CHECK's ``prevResult`` with it; `error_result`
is the error object the plugin prints on stdout before it exits non-zero.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from flagella.errors import FlagellaError

__all__ = [
    "COMMANDS",
    "SUPPORTED_VERSIONS",
    "CniError",
    "Invocation",
    "NetConf",
    "add_result",
    "check_prev_result",
    "error_result",
    "parse_args",
    "parse_config",
    "parse_invocation",
    "version_result",
]

SUPPORTED_VERSIONS: Final = ("1.0.0", "1.1.0")
COMMANDS: Final = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")

# Error codes of the spec (1.0.0 section "Error"); 100 and up are the plugin's own.
INCOMPATIBLE_VERSION: Final = 1
UNKNOWN_CONTAINER: Final = 3
INVALID_ENV: Final = 4
IO_FAILURE: Final = 5
DECODE_FAILURE: Final = 6
INVALID_CONFIG: Final = 7
TRY_AGAIN_LATER: Final = 11
AGENT_REFUSED: Final = 100
AGENT_FAILED: Final = 101

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,14}")
_VERSION = re.compile(r"\d+\.\d+\.\d+")


class CniError(FlagellaError):
    """A failure reported to the runtime as the spec's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code, self.msg, self.details = code, msg, details


@dataclass(frozen=True)
class NetConf:
    """The fields of the network configuration the plugin uses."""

    cni_version: str
    name: str
    type: str
    socket: str | None = None
    mtu: int | None = None
    timeout_s: float = 120.0
    prev_result: dict[str, Any] | None = None
    #: GC: container ids of the attachments the runtime still wants (``None``: not given).
    valid_attachments: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Invocation:
    command: str
    conf: NetConf | None  # None only for VERSION with empty stdin
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)

    @property
    def pod(self) -> tuple[str, str]:
        """(namespace, name) of the Kubernetes pod, ("", "") when the runtime gave none."""
        return self.args.get("K8S_POD_NAMESPACE", ""), self.args.get("K8S_POD_NAME", "")


def _config_error(path: str, reason: str) -> CniError:
    return CniError(INVALID_CONFIG, f"invalid network configuration: {path}: {reason}", path)


def _string(conf: Mapping[str, Any], key: str, required: bool) -> str | None:
    value = conf.get(key)
    if value is None:
        if required:
            raise _config_error(key, "required")
        return None
    if not isinstance(value, str):
        raise _config_error(key, f"expected a string, got {type(value).__name__}")
    return value


def parse_config(raw: bytes) -> NetConf:
    """Parse and check the configuration on stdin (`CniError` names the bad field)."""
    try:
        conf = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CniError(DECODE_FAILURE, "failed to decode the network configuration", str(exc)) from None
    if not isinstance(conf, dict):
        raise _config_error("(top level)", f"expected a JSON object, got {type(conf).__name__}")
    version = _string(conf, "cniVersion", required=True) or ""
    if not _VERSION.fullmatch(version):
        raise _config_error("cniVersion", f"{version!r} is not a version (like 1.0.0)")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version}",
            f"cniVersion: supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    name = _string(conf, "name", required=True) or ""
    if not _NAME.fullmatch(name):
        raise _config_error("name", f"{name!r}: must start with a letter or digit, then letters, digits, '_', '.', '-'")
    kind = _string(conf, "type", required=True) or ""
    if not kind or "/" in kind or "\\" in kind:
        raise _config_error("type", f"{kind!r} is not a plugin name")
    sock = _string(conf, "socket", required=False)
    if sock is not None and not sock.startswith("/"):
        raise _config_error("socket", f"{sock!r} is not an absolute path")
    mtu = conf.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535):
        raise _config_error("mtu", f"{mtu!r}: must be an integer, 576-65535")
    timeout = conf.get("agentTimeoutSeconds", 120.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise _config_error("agentTimeoutSeconds", f"{timeout!r}: must be a number of seconds, 0-3600")
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _config_error("prevResult", f"expected an object, got {type(prev).__name__}")
    return NetConf(
        cni_version=version, name=name, type=kind, socket=sock, mtu=mtu, timeout_s=float(timeout),
        prev_result=prev, valid_attachments=_valid_attachments(conf),
    )


def _valid_attachments(conf: Mapping[str, Any]) -> tuple[str, ...] | None:
    key = "cni.dev/valid-attachments"
    value = conf.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _config_error(key, "expected a list")
    ids = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str):
            raise _config_error(f"{key}[{i}].containerID", "required string")
        ids.append(item["containerID"])
    return tuple(ids)


def parse_args(raw: str) -> dict[str, str]:
    """``CNI_ARGS``: ``K=V`` pairs separated by ``;``."""
    out: dict[str, str] = {}
    for i, part in enumerate(raw.split(";")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, "invalid CNI_ARGS", f"CNI_ARGS: pair {i + 1} {part!r} is not KEY=VALUE")
        out[key] = value
    return out


def _env(env: Mapping[str, str], key: str) -> str:
    value = env.get(key, "")
    if not value:
        raise CniError(INVALID_ENV, f"missing environment variable {key}", key)
    return value


def parse_invocation(env: Mapping[str, str], stdin: bytes) -> Invocation:
    """Check the environment and the configuration for one run of the plugin."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(
            INVALID_ENV, f"CNI_COMMAND: {command!r} is not a command", "CNI_COMMAND: " + ", ".join(COMMANDS)
        )
    if command == "VERSION":  # stdin holds at most {"cniVersion": ...}: nothing to check
        return Invocation(command, None, args={"cniVersion": _requested_version(stdin)})
    conf = parse_config(stdin)
    if command in ("GC", "STATUS"):
        return Invocation(command, conf)
    container_id = _env(env, "CNI_CONTAINERID")
    if not _CONTAINER_ID.fullmatch(container_id):
        raise CniError(
            INVALID_ENV, "invalid CNI_CONTAINERID",
            f"CNI_CONTAINERID: {container_id!r}: letters, digits, '_', '.', '-', starting with a letter or digit",
        )
    ifname = _env(env, "CNI_IFNAME")
    if not _IFNAME.fullmatch(ifname) or ifname in (".", ".."):
        raise CniError(INVALID_ENV, "invalid CNI_IFNAME", f"CNI_IFNAME: {ifname!r} is not an interface name")
    netns = env.get("CNI_NETNS", "") if command == "DEL" else _env(env, "CNI_NETNS")
    if netns and not netns.startswith("/"):
        raise CniError(INVALID_ENV, "invalid CNI_NETNS", f"CNI_NETNS: {netns!r} is not an absolute path")
    args = parse_args(env.get("CNI_ARGS", ""))
    if bool(args.get("K8S_POD_NAMESPACE")) != bool(args.get("K8S_POD_NAME")):
        raise CniError(INVALID_ENV, "invalid CNI_ARGS", "CNI_ARGS: K8S_POD_NAMESPACE and K8S_POD_NAME come together")
    return Invocation(command, conf, container_id, netns, ifname, args)


def _requested_version(stdin: bytes) -> str:
    """The ``cniVersion`` a VERSION probe names, when it is one the plugin speaks."""
    try:
        doc = json.loads(stdin) if stdin.strip() else {}
    except (ValueError, RecursionError):
        doc = {}
    version = doc.get("cniVersion") if isinstance(doc, dict) else None
    return version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[0]


def version_result(inv: Invocation) -> dict[str, Any]:
    return {"cniVersion": inv.args["cniVersion"], "supportedVersions": list(SUPPORTED_VERSIONS)}


def error_result(version: str | None, error: CniError) -> dict[str, Any]:
    out: dict[str, Any] = {"cniVersion": version or SUPPORTED_VERSIONS[0], "code": error.code, "msg": error.msg}
    if error.details:
        out["details"] = error.details
    return out


def add_result(inv: Invocation, answer: Mapping[str, Any]) -> dict[str, Any]:
    """The ADD result for the agent's ``cni.add`` answer."""
    assert inv.conf is not None
    ep = answer["endpoint"]
    gateways = answer["gateways"]
    interface: dict[str, Any] = {"name": ep["ifname"], "mac": ep["mac"], "sandbox": inv.netns}
    if inv.conf.cni_version != "1.0.0" and ep.get("mtu"):
        interface["mtu"] = ep["mtu"]  # 1.1.0 added the field
    ips, routes = [], []
    for family, plen, default in (("ipv4", 32, "0.0.0.0/0"), ("ipv6", 128, "::/0")):
        if ep.get(family):
            ips.append({"address": f"{ep[family]}/{plen}", "gateway": gateways[family], "interface": 0})
            routes.append({"dst": default, "gw": gateways[family]})
    return {"cniVersion": inv.conf.cni_version, "interfaces": [interface], "ips": ips, "routes": routes, "dns": {}}


def check_prev_result(inv: Invocation, answer: Mapping[str, Any]) -> None:
    """CHECK: the runtime's ``prevResult`` must describe what the agent holds."""
    assert inv.conf is not None
    prev = inv.conf.prev_result
    if prev is None:
        return
    want = add_result(inv, answer)
    try:
        have_ifs = {(i["name"], i.get("mac", "")) for i in prev.get("interfaces", []) if "sandbox" in i}
        have_ips = {str(ipaddress.ip_interface(ip["address"])) for ip in prev.get("ips", [])}
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise _config_error("prevResult", f"malformed: {exc}") from None
    want_ifs = {(i["name"], i["mac"]) for i in want["interfaces"]}
    want_ips = {str(ipaddress.ip_interface(ip["address"])) for ip in want["ips"]}
    if not want_ifs <= have_ifs:
        raise CniError(AGENT_REFUSED, "prevResult differs from the attachment", f"interfaces: want {sorted(want_ifs)}, prevResult has {sorted(have_ifs)}")
    if want_ips != have_ips:
        raise CniError(AGENT_REFUSED, "prevResult differs from the attachment", f"ips: agent has {sorted(want_ips)}, prevResult {sorted(have_ips)}")
