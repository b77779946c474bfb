"""CNI attachments: what the agent does for the ``flagella-cni`` plugin, and the network
configuration it writes for the container runtime.

Theory of operation
-------------------
The runtime runs ``flagella-cni`` (`flagella.cni`), which asks the agent over its API
(``cni.add``, ``cni.del``, ``cni.check``, ``cni.gc``). An attachment is one endpoint,
recorded with the runtime's container id. Its name is the pod's (``K8S_POD_NAMESPACE`` /
``K8S_POD_NAME`` from ``CNI_ARGS``), so the Kubernetes watcher finds it by pod
(`AgentCore.set_pod_labels`); without pod arguments it is ``cni/c-<hash of the id>``.

* **ADD** adopts the runtime's namespace (``CNI_NETNS``) under the pod's netns name,
  creates the pod end ``CNI_IFNAME`` there, and answers only once the endpoint exists and
  its policy is enforced (`AgentCore.create_endpoint` waits for the first regeneration
  before it attaches the programs). A pod whose labels the watcher has not reported yet
  runs as ``reserved:init``: policies selecting that label decide its traffic until the
  labels arrive, then it switches to its real identity. A repeated ADD of the same
  container answers the existing attachment; an endpoint of the pod from an older
  sandbox (another container id) is removed first. MTU: the plugin's configuration,
  else the agent's ``cni.mtu``, else the host's default-route MTU, else ``network.mtu``.
* **DEL** removes the container's endpoint; a container without one is a success, so a
  repeated DEL and a DEL of an unknown container succeed (CNI requires it).
* **CHECK** answers what the agent knows and what the kernel shows: the endpoint is ready
  and its pod end, found as the host veth's peer, has the endpoint's name and addresses.
* **GC** removes every CNI endpoint whose container id is not among the valid ones.

`write_conflist` writes the configuration file atomically (temporary file in the same
directory, fsync, rename), so a runtime never reads half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from flagella.agent.core import AgentCore
from flagella.agent.settings import AgentSettings
from flagella.datapath.links import GATEWAY_IPV4, GATEWAY_IPV6
from flagella.endpoint import Endpoint, State
from flagella.errors import InputError

__all__ = ["CNI_VERSION", "CniAttachments", "conflist", "write_conflist"]

#: The spec version of the configuration the agent writes.
CNI_VERSION = "1.0.0"
#: Namespace of endpoints whose runtime gave no Kubernetes pod.
PODLESS_NAMESPACE = "cni"
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}")


def conflist(settings: AgentSettings) -> dict[str, Any]:
    """The network configuration list the runtime reads."""
    plugin: dict[str, Any] = {"type": "flagella-cni", "socket": settings.socket_path}
    if settings.cni.mtu:
        plugin["mtu"] = settings.cni.mtu
    return {
        "cniVersion": CNI_VERSION,
        "cniVersions": [CNI_VERSION, "1.1.0"],
        "name": settings.cni.network_name,
        "plugins": [plugin],
    }


def write_conflist(settings: AgentSettings) -> Path | None:
    """Write `conflist` into ``cni.conf_dir`` atomically; None when no dir is configured."""
    if not settings.cni.conf_dir:
        return None
    directory = Path(settings.cni.conf_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / settings.cni.conf_name
    data = (json.dumps(conflist(settings), indent=2, sort_keys=True) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{settings.cni.conf_name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def _container_id(p: dict[str, Any]) -> str:
    value = p.get("container_id")
    if not isinstance(value, str) or not _CONTAINER_ID.fullmatch(value):
        raise InputError("container_id: required; letters, digits, '_', '.', '-' (CNI_CONTAINERID)")
    return value


def _text(p: dict[str, Any], key: str, required: bool = False) -> str:
    value = p.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputError(f"{key}: expected a string")
    if required and not value:
        raise InputError(f"{key}: required")
    return value


class CniAttachments:
    """The ``cni.*`` API methods on an `AgentCore` (called under the server's lock)."""

    def __init__(self, core: AgentCore) -> None:
        self.core = core

    def handlers(self) -> dict[str, Any]:
        return {"cni.add": self.add, "cni.del": self.delete, "cni.check": self.check, "cni.gc": self.gc}

    def _by_container(self, container_id: str) -> Endpoint | None:
        return next((e for e in self.core.endpoints.values() if e.container_id == container_id), None)

    def _answer(self, ep: Endpoint) -> dict[str, Any]:
        return {
            "endpoint": ep.to_json(),
            "gateways": {"ipv4": str(GATEWAY_IPV4), "ipv6": str(GATEWAY_IPV6)},
        }

    def add(self, p: dict[str, Any]) -> dict[str, Any]:
        container_id = _container_id(p)
        netns_path = _text(p, "netns", required=True)
        if not netns_path.startswith("/"):
            raise InputError(f"netns: {netns_path!r} is not an absolute path (CNI_NETNS)")
        ifname = _text(p, "ifname", required=True)
        namespace = _text(p, "pod_namespace")
        name = _text(p, "pod_name")
        if bool(namespace) != bool(name):
            raise InputError("pod_namespace, pod_name: give both (K8S_POD_NAMESPACE, K8S_POD_NAME) or neither")
        if not name:
            namespace = PODLESS_NAMESPACE
            name = "c-" + hashlib.sha256(container_id.encode()).hexdigest()[:16]
        mtu = p.get("mtu") or 0
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not (mtu == 0 or 576 <= mtu <= 65535):
            raise InputError("mtu: must be 576-65535")
        existing = self._by_container(container_id)
        if existing is not None:
            if existing.ifname != ifname or (existing.namespace, existing.name) != (namespace, name):
                raise InputError(
                    f"container {container_id} already has interface {existing.ifname} as "
                    f"{existing.namespace}/{existing.name}"
                )
            return self._answer(existing)
        stale = next(
            (e for e in self.core.endpoints.values() if (e.namespace, e.name) == (namespace, name)), None
        )
        if stale is not None:
            if not stale.container_id:
                raise InputError(f"endpoint {namespace}/{name} already exists and was not made by CNI")
            self.core.delete_endpoint(stale.id)  # the runtime replaced the pod's sandbox
        known = self.core.known_pods.get((namespace, name))
        ep = self.core.create_endpoint(
            name=name,
            namespace=namespace,
            labels=known[0] if known else None,
            service_account=known[1] if known else None,
            container_id=container_id,
            netns_path=netns_path,
            ifname=ifname,
            mtu=mtu or self.core.settings.cni.mtu or self.core.dp.host_route_mtu() or 0,
            init_identity=known is None,
        )
        return self._answer(ep)

    def delete(self, p: dict[str, Any]) -> dict[str, Any]:
        ep = self._by_container(_container_id(p))
        if ep is None:
            return {"deleted": False}
        self.core.delete_endpoint(ep.id)
        return {"deleted": True, "endpoint": ep.id}

    def check(self, p: dict[str, Any]) -> dict[str, Any]:
        """``found`` false: no attachment; else ``problems`` lists what is not as expected."""
        ep = self._by_container(_container_id(p))
        if ep is None:
            return {"found": False, "problems": []}
        problems = []
        ifname = _text(p, "ifname")
        if ifname and ifname != ep.ifname:
            problems.append(f"the endpoint's interface is {ep.ifname}, not {ifname}")
        if ep.state != State.READY:
            problems.append(f"endpoint {ep.id} is {ep.state.value}: {ep.state_reason}")
        pod = next((pod for pod in self.core.dp.list_pods() if pod.netns == ep.netns), None)
        if pod is None:
            addresses = ", ".join(str(a) for a in sorted(ep.addresses(), key=str))
            problems.append(
                f"no pod interface {ep.ifname} with {addresses} behind host veth {ep.host_ifname} (missing)"
            )
        else:
            if pod.pod_ifname != ep.ifname:
                problems.append(f"the host veth's peer is {pod.pod_ifname}, not {ep.ifname}")
            if (pod.ipv4, pod.ipv6) != (ep.ipv4, ep.ipv6):
                problems.append(
                    f"the pod's addresses are {pod.ipv4}, {pod.ipv6}; the endpoint's {ep.ipv4}, {ep.ipv6}"
                )
            if pod.ifindex != ep.ifindex:
                problems.append(f"the host veth is ifindex {pod.ifindex}, recorded {ep.ifindex}")
        return {"found": True, "problems": problems, **self._answer(ep)}

    def gc(self, p: dict[str, Any]) -> dict[str, Any]:
        valid = p.get("valid")
        if not isinstance(valid, list) or not all(isinstance(v, str) for v in valid):
            raise InputError("valid: expected a list of container ids")
        keep = set(valid)
        stale = [e for e in self.core.endpoints.values() if e.container_id and e.container_id not in keep]
        for ep in stale:
            self.core.delete_endpoint(ep.id)
        return {"deleted": sorted(e.container_id for e in stale)}
