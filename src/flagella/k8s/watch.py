"""List-then-watch of one Kubernetes resource, with resourceVersion bookkeeping.

Theory of operation. A `Watcher` keeps a local copy of the objects of one kind,
keyed by namespace/name, and the resourceVersion it is in sync with. Its life is
the state machine in `TRANSITIONS`:

    LIST  --list ok-->  WATCH  --stream ends (timeout)-->  WATCH (same rv)
    WATCH --410 Gone / ERROR event with code 410-->  LIST  (relist, diff, resync)
    WATCH --BOOKMARK-->  WATCH (rv advances, nothing delivered)

A relist diffs the fresh list against the local copy, so the handler sees an
upsert for every new or changed object and a delete for every object that
vanished while the watch was gone: nothing is missed and nothing is delivered
twice with the same resourceVersion. Objects are plain JSON dicts (the client's
``_preload_content=False`` path), exactly as the API server sends them.

Handlers run on the watcher's thread; `flagella.k8s.controller` translates.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from flagella.errors import FlagellaError

log = structlog.get_logger("flagella.k8s")

Obj = dict[str, Any]
Handler = Callable[[str, Obj], None]  # ("upsert" | "delete", object)

#: (state, event) -> next state.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("list", "listed"): "watch",
    ("watch", "ADDED"): "watch",
    ("watch", "MODIFIED"): "watch",
    ("watch", "DELETED"): "watch",
    ("watch", "BOOKMARK"): "watch",
    ("watch", "ended"): "watch",
    ("watch", "gone"): "list",
    ("list", "failed"): "list",
    ("watch", "failed"): "list",
}


class WatchError(FlagellaError):
    """The API server answered a list or watch with an error other than 410 Gone."""


@dataclass(frozen=True)
class Resource:
    """One watched kind: the API paths the client calls."""

    kind: str
    group: str = ""  # "" = core
    version: str = "v1"
    plural: str = ""

    @property
    def path(self) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{base}/{self.plural}"


PODS = Resource("Pod", plural="pods")
NAMESPACES = Resource("Namespace", plural="namespaces")
NODES = Resource("Node", plural="nodes")
NETWORK_POLICIES = Resource("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies")
CNPS = Resource("CiliumNetworkPolicy", "cilium.io", "v2", "ciliumnetworkpolicies")
CCNPS = Resource("CiliumClusterwideNetworkPolicy", "cilium.io", "v2", "ciliumclusterwidenetworkpolicies")


def key_of(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or ""
    return f"{ns}/{meta.get('name', '')}"


class Watcher:
    def __init__(
        self,
        api: client.ApiClient,
        resource: Resource,
        handler: Handler,
        *,
        field_selector: str = "",
        timeout_s: int = 300,
        on_listed: Callable[[Mapping[str, Obj]], None] | None = None,
    ) -> None:
        """``on_listed`` gets the whole local copy after every list (the first one included):
        what the cluster holds, so that state kept from before the agent started and gone
        from the cluster meanwhile can be dropped."""
        self.api = api
        self.resource = resource
        self.handler = handler
        self.on_listed = on_listed
        self.field_selector = field_selector
        self.timeout_s = timeout_s
        self.state = "list"
        self.resource_version = ""
        self.objects: dict[str, Obj] = {}
        self.relists = 0
        self._stop = threading.Event()

    def _step(self, event: str) -> None:
        self.state = TRANSITIONS[(self.state, event)]

    def _get(self, query: list[tuple[str, str]]) -> Any:
        """GET the resource path; None for 410 Gone, `WatchError` for other failures."""
        if self.field_selector:
            query.append(("fieldSelector", self.field_selector))
        resp = request(self.api, "GET", self.resource.path, query=query, timeout_s=self.timeout_s + 30)
        if resp.status == 410:
            resp.response.release_conn()
            return None
        if not 200 <= resp.status < 300:
            body = resp.read()[:300].decode(errors="replace")
            raise WatchError(f"{self.resource.kind}: {resp.status} {resp.reason}: {body}")
        return resp

    def list(self) -> None:
        """Fetch every object; deliver the difference from the local copy."""
        resp = self._get([])
        if resp is None:
            raise WatchError(f"{self.resource.kind}: list answered 410 Gone")
        body = json.loads(resp.read())
        fresh = {key_of(o): o for o in body.get("items") or []}
        for k, old in list(self.objects.items()):
            if k not in fresh:
                del self.objects[k]
                self.handler("delete", old)
        for k, obj in fresh.items():
            kind_obj = {"kind": self.resource.kind, **obj}
            known = self.objects.get(k)
            if known is None or _rv(known) != _rv(kind_obj):
                self.objects[k] = kind_obj
                self.handler("upsert", kind_obj)
        if self.resource_version:
            self.relists += 1
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion", ""))
        self.state = "list"
        self._step("listed")
        if self.on_listed is not None:
            self.on_listed(self.objects)

    def _events(self) -> Iterator[Obj] | None:
        resp = self._get([
            ("watch", "true"), ("resourceVersion", self.resource_version),
            ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(self.timeout_s)),
        ])
        if resp is None:
            return None

        def lines() -> Iterator[Obj]:
            try:
                buf = b""
                for chunk in resp.response.stream(4096):
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            yield json.loads(line)
                if buf.strip():
                    yield json.loads(buf)
            finally:
                resp.response.release_conn()

        return lines()

    def watch_once(self) -> int:
        """One watch request, until the server ends it; on 410 Gone, relist.

        Answers how many events the stream carried."""
        events = self._events()
        if events is None:
            self._step("gone")
            self.list()
            return 0
        seen = 0
        for ev in events:
            seen += 1
            kind, obj = ev.get("type", ""), ev.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    self._step("gone")
                    self.list()
                    return seen
                raise WatchError(f"{self.resource.kind}: watch error {obj.get('code')}: {obj.get('message')}")
            self._step(kind)
            rv = _rv(obj)
            if kind == "BOOKMARK":
                self.resource_version = rv or self.resource_version
                continue
            obj = {"kind": self.resource.kind, **obj}
            k = key_of(obj)
            if kind == "DELETED":
                if self.objects.pop(k, None) is not None:
                    self.handler("delete", obj)
            elif self.objects.get(k) is None or _rv(self.objects[k]) != rv:
                self.objects[k] = obj
                self.handler("upsert", obj)
            self.resource_version = rv or self.resource_version
            if self._stop.is_set():
                return seen
        self._step("ended")
        return seen

    def run(self) -> None:
        """List, then watch until `stop`; errors are logged and lead to a relist."""
        while not self._stop.is_set():
            try:
                if self.state == "list":
                    self.list()
                if not self.watch_once():
                    # A real server holds an idle watch open for timeoutSeconds; one that
                    # ends it at once must not be hammered.
                    self._stop.wait(1.0)
            except (WatchError, OSError, ValueError) as exc:
                log.warning("k8s-watch-failed", kind=self.resource.kind, error=str(exc))
                self.state = "list"
                self._step("failed")
                self._stop.wait(1.0)
            except Exception as exc:  # urllib3 errors: the API server went away
                log.warning("k8s-watch-failed", kind=self.resource.kind, error=repr(exc))
                self.state = "list"
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when stopped meanwhile."""
        self._stop.wait(seconds)


def request(
    api: client.ApiClient,
    method: str,
    path: str,
    *,
    query: list[tuple[str, str]] | None = None,
    body: object = None,
    content_type: str = "",
    timeout_s: float | None = None,
) -> Any:
    """One raw request through the client (auth, TLS, host from its configuration);
    the response is not read: callers read or stream it. Transport errors are `WatchError`."""
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    method_, url, headers_, body_, post = api.param_serialize(
        method, path, query_params=query or [], header_params=headers, body=body,
        auth_settings=["BearerToken"],
    )
    try:
        return api.call_api(method_, url, headers_, body_, post, _request_timeout=timeout_s)
    except ApiException as exc:
        raise WatchError(f"{method} {path}: {exc.status} {exc.reason}") from None


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))
