"""Agent-facing commands: ``agent``, ``endpoint``, ``namespace``, ``policy import|get|delete``,
``identity``, ``bpf``, ``monitor``, ``status``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from flagella.cli._client import call, stream
from flagella.errors import AgentUnavailable, FlagellaError, InputError, PolicyValidationError
from flagella.policy.api import load_policy_files

SocketOpt = Annotated[str | None, typer.Option("--socket", help="Agent socket (or $FLAGELLA_SOCKET)")]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="text or json")]

endpoint_app = typer.Typer(no_args_is_help=True, help="Manage endpoints (pods).")
namespace_app = typer.Typer(no_args_is_help=True, help="Namespace labels.")
identity_app = typer.Typer(no_args_is_help=True, help="Security identities.")
bpf_app = typer.Typer(no_args_is_help=True, help="Raw kernel maps.")
bpf_policy_app = typer.Typer(no_args_is_help=True)
bpf_ct_app = typer.Typer(no_args_is_help=True)
bpf_ipcache_app = typer.Typer(no_args_is_help=True)
bpf_metrics_app = typer.Typer(no_args_is_help=True)
proxy_app = typer.Typer(no_args_is_help=True, help="The Envoy proxies the agent's xDS server feeds.")
bpf_app.add_typer(bpf_policy_app, name="policy", help="Policy map entries of an endpoint.")
bpf_app.add_typer(bpf_ct_app, name="ct", help="Connection tracking entries.")
bpf_app.add_typer(bpf_ipcache_app, name="ipcache", help="IP/CIDR -> identity.")
bpf_app.add_typer(bpf_metrics_app, name="metrics", help="Datapath drop/forward counters.")


def run(method: str, params: dict[str, Any], socket: str | None, timeout: float = 300.0) -> Any:
    try:
        return call(socket, method, params, timeout=timeout)
    except PolicyValidationError:
        raise
    except InputError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    except AgentUnavailable as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except FlagellaError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None


def emit(result: Any, output: str, text: Any = None) -> None:
    if output == "json" or text is None:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        typer.echo(text(result))


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells)


# -- agent ------------------------------------------------------------------------------


def agent(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Settings file (YAML/JSON)")] = None,
    state_dir: Annotated[str | None, typer.Option("--state-dir")] = None,
    socket: SocketOpt = None,
    metrics_addr: Annotated[str | None, typer.Option("--metrics-addr", help="HOST:PORT, '' disables")] = None,
    bpf_dir: Annotated[str | None, typer.Option("--bpf-dir")] = None,
    k8s_kubeconfig: Annotated[
        str | None, typer.Option("--k8s-kubeconfig", help="Watch the cluster this kubeconfig names")
    ] = None,
    k8s_in_cluster: Annotated[
        bool | None, typer.Option("--k8s-in-cluster", help="Watch the cluster the agent's pod runs in")
    ] = None,
    k8s_node_name: Annotated[
        str | None, typer.Option("--k8s-node-name", envvar="K8S_NODE_NAME", help="This node's name")
    ] = None,
    k8s_require_ipv4_pod_cidr: Annotated[
        bool | None, typer.Option("--k8s-require-ipv4-pod-cidr", help="No endpoints until the node has an IPv4 PodCIDR")
    ] = None,
    k8s_require_ipv6_pod_cidr: Annotated[
        bool | None, typer.Option("--k8s-require-ipv6-pod-cidr", help="No endpoints until the node has an IPv6 PodCIDR")
    ] = None,
    ipv6_cluster_alloc_cidr: Annotated[
        str | None, typer.Option("--ipv6-cluster-alloc-cidr", help="Every node's IPv6 PodCIDR lies inside it")
    ] = None,
    container_runtime: Annotated[
        str | None, typer.Option("--container-runtime", help="auto (from its socket), docker, containerd, crio, none")
    ] = None,
    k8s_create_endpoints: Annotated[
        bool | None, typer.Option("--k8s-create-endpoints", help="No CNI plugin: the agent creates pods' endpoints")
    ] = None,
) -> None:
    """Run the agent in the foreground."""
    from flagella.agent import run

    k8s = {
        "kubeconfig": k8s_kubeconfig, "in_cluster": k8s_in_cluster, "node_name": k8s_node_name,
        "require_ipv4_pod_cidr": k8s_require_ipv4_pod_cidr, "require_ipv6_pod_cidr": k8s_require_ipv6_pod_cidr,
        "ipv6_cluster_alloc_cidr": ipv6_cluster_alloc_cidr, "container_runtime": container_runtime,
        "create_endpoints": k8s_create_endpoints,
    }
    try:
        run(config, state_dir=state_dir, socket=socket, metrics_addr=metrics_addr, bpf_dir=bpf_dir, k8s=k8s)
    except InputError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None


def status(socket: SocketOpt = None, output: OutputOpt = "text") -> None:
    """Exit 0 when the agent answers."""
    result = run("status", {}, socket)

    def text(r: dict[str, Any]) -> str:
        ctl = r["controllers"]
        healthy = sum(1 for c in ctl if not c["consecutive_failures"])
        return "\n".join(
            [
                "Flagella: OK",
                f"Endpoints: {r['endpoints']}",
                f"Policies: {r['policies']} (revision {r['revision']})",
                f"Identities: {r['identities']}",
                f"Controller Status: {healthy}/{len(ctl)} healthy",
                f"Map repairs: {sum(r['repairs'].values())}",
                f"Attachment repairs: {sum(r.get('attach_repairs', {}).values())}",
                *_k8s_status_lines(r.get("k8s")),
            ]
        )

    emit(result, output, text)


def _k8s_status_lines(k8s: dict[str, Any] | None) -> list[str]:
    if not k8s:
        return []
    line = f"Kubernetes: node {k8s['node']}, runtime {k8s['runtime']}, {k8s['skipped']} objects skipped"
    return [line + (f"; {k8s['waiting']}" if k8s.get("waiting") else "")]


# -- endpoints -------------------------------------------------------------------------------


def _ep_text(eps: list[dict[str, Any]]) -> str:
    rows = [
        [
            e["id"],
            "Enabled" if e["policy_enforcement"]["ingress"] else "Disabled",
            "Enabled" if e["policy_enforcement"]["egress"] else "Disabled",
            e["identity"],
            f"{e['namespace']}/{e['name']}",
            ",".join(f"{k}={v}" for k, v in sorted(e["labels"].items())),
            e["ipv6"] or "",
            e["ipv4"] or "",
            e["state"] + (f" ({e['state_reason']})" if e.get("state_reason") else ""),
        ]
        for e in eps
    ]
    return table(
        rows,
        ["ENDPOINT", "POLICY (ingress)", "POLICY (egress)", "IDENTITY", "NAME", "LABELS", "IPv6", "IPv4", "STATUS"],
    )


@endpoint_app.command("create")
def endpoint_create(
    name: str,
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    labels: Annotated[str, typer.Option("--labels", "-l", help="k=v,...")] = "",
    namespace_labels: Annotated[str, typer.Option("--namespace-labels")] = "",
    service_account: Annotated[str | None, typer.Option("--service-account")] = None,
    ipv4: Annotated[str | None, typer.Option("--ipv4")] = None,
    ipv6: Annotated[str | None, typer.Option("--ipv6")] = None,
    named_port: Annotated[list[str], typer.Option("--named-port", help="NAME=PORT/PROTO")] = [],  # noqa: B006
    socket: SocketOpt = None,
    output: OutputOpt = "text",
) -> None:
    """Create a pod (netns + veth + addresses), give it an identity and enforce policy."""
    result = run(
        "endpoint.create",
        {
            "name": name,
            "namespace": namespace,
            "labels": [labels] if labels else [],
            "namespace_labels": [namespace_labels] if namespace_labels else [],
            "service_account": service_account,
            "ipv4": ipv4,
            "ipv6": ipv6,
            "named_ports": named_port,
        },
        socket,
    )
    emit(result, output, lambda r: _ep_text([r]))


@endpoint_app.command("list")
def endpoint_list(socket: SocketOpt = None, output: OutputOpt = "text") -> None:
    emit(run("endpoint.list", {}, socket), output, _ep_text)


@endpoint_app.command("get")
def endpoint_get(name: str, socket: SocketOpt = None, output: OutputOpt = "json") -> None:
    emit(run("endpoint.get", {"name": name}, socket), output)


@endpoint_app.command("delete")
def endpoint_delete(names: list[str], socket: SocketOpt = None) -> None:
    for name in names:
        r = run("endpoint.delete", {"name": name}, socket)
        typer.echo(f"Endpoint {r['id']} ({r['namespace']}/{r['name']}) deleted")


@endpoint_app.command("labels")
def endpoint_labels(
    name: str,
    set_: Annotated[list[str], typer.Option("--set", help="k=v")] = [],  # noqa: B006
    unset: Annotated[list[str], typer.Option("--unset", help="key")] = [],  # noqa: B006
    socket: SocketOpt = None,
    output: OutputOpt = "text",
) -> None:
    """Change an endpoint's labels; it gets its new identity and peers follow."""
    r = run("endpoint.labels", {"name": name, "set": set_, "unset": unset}, socket)
    emit(r, output, lambda e: _ep_text([e]))


@namespace_app.command("labels")
def namespace_labels(
    namespace: str,
    set_: Annotated[list[str], typer.Option("--set", help="k=v")] = [],  # noqa: B006
    unset: Annotated[list[str], typer.Option("--unset", help="key")] = [],  # noqa: B006
    socket: SocketOpt = None,
    output: OutputOpt = "text",
) -> None:
    r = run("namespace.labels", {"namespace": namespace, "set": set_, "unset": unset}, socket)
    emit(r, output, lambda labels: ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(no labels)")


# -- policy ---------------------------------------------------------------------------------------


def policy_import(
    files: list[Path],
    wait: Annotated[
        bool, typer.Option("--wait", help="Return once every endpoint realized the revision with every enforcer")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds --wait waits before failing", min=0)
    ] = 60.0,
    socket: SocketOpt = None,
    output: OutputOpt = "text",
) -> None:
    """Import policy files atomically; print the new revision."""
    try:
        policies = load_policy_files(files)
    except PolicyValidationError as exc:
        for e in exc.errors:
            typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    docs = [p.source for p in policies]
    sources = [f"{p.kind} {p.namespace + '/' if p.namespace else ''}{p.name}" for p in policies]
    try:
        r = run("policy.import", {"documents": docs, "sources": sources}, socket)
    except PolicyValidationError as exc:
        for e in exc.errors:
            typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    if wait:
        w = run("policy.wait", {"revision": r["revision"], "timeout": timeout}, socket, timeout=timeout + 30)
        if w["lagging"]:
            typer.echo(
                f"Error: revision {r['revision']} not realized within {timeout:g}s by "
                + ", ".join(_lagging_text(ep) for ep in w["lagging"]),
                err=True,
            )
            raise typer.Exit(1)
    emit(r, output, lambda x: f"Revision: {x['revision']}")


def _lagging_text(ep: dict[str, Any]) -> str:
    reason = f": {ep['state_reason']}" if ep.get("state_reason") else ""
    return (
        f"{ep['namespace']}/{ep['name']} (endpoint {ep['id']}, {ep['state']}{reason}, "
        f"at revision {ep['policy_revision']})"
    )


def policy_get(socket: SocketOpt = None, output: OutputOpt = "text") -> None:
    r = run("policy.get", {}, socket)
    if output == "json":
        emit(r, output)
        return
    if r["policies"]:
        typer.echo(yaml.safe_dump_all(r["policies"], sort_keys=False).rstrip())
    typer.echo(f"Revision: {r['revision']}")


def policy_delete(
    names: Annotated[list[str] | None, typer.Argument()] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    all_: Annotated[bool, typer.Option("--all")] = False,
    socket: SocketOpt = None,
    output: OutputOpt = "text",
) -> None:
    if not names and not all_:
        typer.echo("Error: give policy names or --all", err=True)
        raise typer.Exit(2)
    r = run("policy.delete", {"names": names or [], "namespace": namespace, "all": all_}, socket)
    emit(r, output, lambda x: f"Revision: {x['revision']}")


# -- identities, maps, monitor -------------------------------------------------------------------------


@identity_app.command("list")
def identity_list(socket: SocketOpt = None, output: OutputOpt = "text") -> None:
    r = run("identity.list", {}, socket)
    emit(r, output, lambda ids: table([[i["id"], ",".join(i["labels"])] for i in ids], ["ID", "LABELS"]))


@identity_app.command("get")
def identity_get(ident: int, socket: SocketOpt = None, output: OutputOpt = "json") -> None:
    emit(run("identity.get", {"id": ident}, socket), output)


@bpf_policy_app.command("get")
def bpf_policy_get(endpoint: str, socket: SocketOpt = None, output: OutputOpt = "text") -> None:
    r = run("bpf.policy", {"name": endpoint}, socket)
    emit(
        r,
        output,
        lambda rows: table(
            [[x["direction"], x["identity"] or "any", x["protocol"] or "any", x["ports"], x["verdict"], x["proxy_port"] or "", x["packets"], x["bytes"]] for x in rows],
            ["DIRECTION", "IDENTITY", "PROTO", "PORTS", "VERDICT", "PROXY", "PACKETS", "BYTES"],
        ),
    )


@bpf_ct_app.command("list")
def bpf_ct_list(socket: SocketOpt = None, output: OutputOpt = "text") -> None:
    r = run("bpf.ct", {}, socket)
    emit(r, output, lambda rows: table(
        [[x["endpoint"], x["direction"], x["proto"], x["src"], x["dst"], x["expires_in_s"], x["packets"]] for x in rows],
        ["ENDPOINT", "DIR", "PROTO", "SRC", "DST", "EXPIRES(s)", "PACKETS"]))


@bpf_ipcache_app.command("list")
def bpf_ipcache_list(socket: SocketOpt = None, output: OutputOpt = "text") -> None:
    r = run("bpf.ipcache", {}, socket)
    emit(r, output, lambda rows: table([[x["prefix"], x["identity"]] for x in rows], ["PREFIX", "IDENTITY"]))


@bpf_metrics_app.command("list")
def bpf_metrics_list(socket: SocketOpt = None, output: OutputOpt = "text") -> None:
    r = run("bpf.metrics", {}, socket)
    emit(r, output, lambda rows: table(
        [[x["reason"], x["direction"], x["packets"], x["bytes"]] for x in rows],
        ["REASON", "DIRECTION", "PACKETS", "BYTES"]))


@proxy_app.command("status")
def proxy_status(socket: SocketOpt = None, output: OutputOpt = "text") -> None:
    """Every connected proxy: per type, version sent and ACKed, last NACK, last ACK time."""
    from flagella.xds.status import render_proxy_status, rows_from_json

    rows = rows_from_json(run("proxy.status", {}, socket))
    if output not in ("text", "json"):
        raise InputError(f"--output: {output!r} is not text or json")
    typer.echo(render_proxy_status(rows, output), nl=False)


def format_event(ev: dict[str, Any]) -> str:
    if ev.get("type") == "l7":
        return str(ev.get("line", ""))
    if ev.get("type") == "drop":
        return (
            f"xx drop ({ev.get('reason_name', ev.get('reason'))}) to endpoint {ev.get('ep_id')}, "
            f"identity {ev.get('src_identity')}->{ev.get('dst_identity')}: "
            f"{ev.get('src')} -> {ev.get('dst')} {ev.get('proto_name', ev.get('proto'))}"
        )
    return (
        f"-> endpoint {ev.get('ep_id')} identity {ev.get('src_identity')}->{ev.get('dst_identity')} "
        f"state {ev.get('ct_state')}: {ev.get('src')} -> {ev.get('dst')} {ev.get('proto_name', ev.get('proto'))}"
    )


def monitor(
    type_: Annotated[str | None, typer.Option("--type", "-t", help="drop, trace or l7")] = None,
    socket: SocketOpt = None,
    output: OutputOpt = "text",
) -> None:
    """Print datapath events and the node proxy's L7 records as they happen (Ctrl-C to stop)."""
    if type_ not in (None, "drop", "trace", "l7"):
        typer.echo("Error: --type must be drop, trace or l7", err=True)
        raise typer.Exit(2)
    try:
        for ev in stream(socket, "monitor", {"type": type_}):
            typer.echo(json.dumps(ev, sort_keys=True) if output == "json" else format_event(ev))
            sys.stdout.flush()
    except AgentUnavailable as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer, policy_app: typer.Typer) -> None:
    app.command("agent")(agent)
    app.command("status")(status)
    app.command("monitor")(monitor)
    app.add_typer(endpoint_app, name="endpoint")
    app.add_typer(namespace_app, name="namespace")
    app.add_typer(identity_app, name="identity")
    app.add_typer(bpf_app, name="bpf")
    app.add_typer(proxy_app, name="proxy")
    policy_app.command("import")(policy_import)
    policy_app.command("get")(policy_get)
    policy_app.command("delete")(policy_delete)
