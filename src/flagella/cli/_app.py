"""The ``flagella`` command line: policy tools offline, agent commands online.

Exit status: 0 when the command ran (a trace that says "denied" ran fine),
1 when the agent is unreachable or failed, 2 on bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from flagella.errors import AgentUnavailable, FlagellaError, InputError, PolicyValidationError
from flagella.policy import query as ti
from flagella.policy.api import load_policy_files
from flagella.policy.resolver import PolicySettings
from flagella.policy.trace import Side, TraceQuery, Tracer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Flagella: identity-aware network security for containers.")
policy_app = typer.Typer(no_args_is_help=True, help="Validate, trace and manage policy.")
app.add_typer(policy_app, name="policy")


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


@policy_app.command("validate")
def policy_validate(
    files: Annotated[list[Path], typer.Argument(help="Policy files (YAML or JSON)")],
    output: Annotated[str, typer.Option("--output", "-o", help="text or json")] = "text",
) -> None:
    """Parse and validate policy files; nothing is imported."""
    try:
        policies = load_policy_files(files)
    except PolicyValidationError as exc:
        if output == "json":
            typer.echo(json.dumps({"valid": False, "errors": [str(e) for e in exc.errors]}))
        else:
            for e in exc.errors:
                typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    except InputError as exc:
        raise fail(str(exc)) from None
    if output == "json":
        typer.echo(json.dumps({"valid": True, "policies": [f"{p.kind} {p.namespace}/{p.name}".replace(" /", " ") for p in policies]}))
    else:
        for p in policies:
            where = f"{p.namespace}/{p.name}" if p.namespace else p.name
            typer.echo(f"{p.kind} {where}: valid ({len(p.rules)} rules)")


def _settings(enforcement: str, allow_localhost: str, legacy_host_allows_world: bool) -> PolicySettings:
    if enforcement not in ("default", "always", "never"):
        raise InputError(f"--enforcement: {enforcement!r} is not default, always or never")
    if allow_localhost not in ("always", "policy"):
        raise InputError(f"--allow-localhost: {allow_localhost!r} is not always or policy")
    return PolicySettings(
        enforcement=enforcement,  # type: ignore[arg-type]
        allow_localhost=allow_localhost,  # type: ignore[arg-type]
        legacy_host_allows_world=legacy_host_allows_world,
    )


@policy_app.command("trace")
def policy_trace(
    policy: Annotated[list[Path], typer.Option("--policy", "-p", help="Policy file (repeatable); offline mode")] = [],  # noqa: B006
    src_labels: Annotated[str | None, typer.Option("--src-labels", "-s")] = None,
    src_ip: Annotated[str | None, typer.Option("--src-ip")] = None,
    dst_labels: Annotated[str | None, typer.Option("--dst-labels", "-d")] = None,
    dst_ip: Annotated[str | None, typer.Option("--dst-ip")] = None,
    dst_named_port: Annotated[list[str], typer.Option("--dst-named-port", help="NAME=PORT/PROTO")] = [],  # noqa: B006
    dport: Annotated[str | None, typer.Option("--dport", help="PORT/PROTO, e.g. 80/TCP, 8/ICMP")] = None,
    http_method: Annotated[str | None, typer.Option("--http-method")] = None,
    http_path: Annotated[str | None, typer.Option("--http-path")] = None,
    http_header: Annotated[list[str], typer.Option("--http-header", help="'Name: value'")] = [],  # noqa: B006
    kafka_api_key: Annotated[str | None, typer.Option("--kafka-api-key")] = None,
    kafka_api_version: Annotated[int | None, typer.Option("--kafka-api-version")] = None,
    kafka_topic: Annotated[str | None, typer.Option("--kafka-topic")] = None,
    kafka_client_id: Annotated[str | None, typer.Option("--kafka-client-id")] = None,
    queries: Annotated[Path | None, typer.Option("--queries", help="JSON lines, one query each")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="text or json")] = "text",
    enforcement: Annotated[str, typer.Option("--enforcement", help="default, always or never")] = "default",
    allow_localhost: Annotated[str, typer.Option("--allow-localhost", help="always or policy")] = "always",
    legacy_host_allows_world: Annotated[bool, typer.Option("--legacy-host-allows-world")] = False,
    src_endpoint: Annotated[str | None, typer.Option("--src-endpoint", help="Live endpoint (online mode)")] = None,
    dst_endpoint: Annotated[str | None, typer.Option("--dst-endpoint", help="Live endpoint (online mode)")] = None,
    socket: Annotated[str | None, typer.Option("--socket", help="Agent socket (online mode)")] = None,
) -> None:
    """Trace a packet or request from a source to a destination through policy."""
    try:
        if output not in ("text", "json"):
            raise InputError("--output: must be text or json")
        settings = _settings(enforcement, allow_localhost, legacy_host_allows_world)
        if (src_endpoint or dst_endpoint) and policy:
            raise InputError("--src-endpoint/--dst-endpoint name live endpoints: online mode only (no --policy)")
        flags = (
            src_labels, src_ip, dst_labels, dst_ip, dst_named_port, dport,
            http_method, http_path, http_header,
            kafka_api_key, kafka_api_version, kafka_topic, kafka_client_id,
        )
        if not policy:
            from flagella.cli._online import online_trace, query_json

            if queries is not None:
                raw = [query_json(q) for q in _read_queries(queries)]
            else:
                raw = [_online_flag_query(src_endpoint, dst_endpoint, *flags)]
            results = online_trace(socket, raw, "json" if queries is not None else output)
        else:
            qs = _read_queries(queries) if queries is not None else [_flag_query(*flags)]
            tracer = Tracer(load_policy_files(policy), settings)
            results = [tracer.trace(q).to_json() if output == "json" or queries else tracer.trace(q) for q in qs]
    except PolicyValidationError as exc:
        for e in exc.errors:
            typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    except InputError as exc:
        raise fail(str(exc)) from None
    except AgentUnavailable as exc:
        raise fail(str(exc), 1) from None
    for r in results:
        if isinstance(r, dict):
            typer.echo(json.dumps(r, sort_keys=True))
        elif isinstance(r, str):
            typer.echo(r)
        else:
            typer.echo(r.to_text())


def _read_queries(path: Path) -> list[TraceQuery]:
    try:
        lines = path.read_text().splitlines() if str(path) != "-" else sys.stdin.read().splitlines()
    except OSError as exc:
        raise InputError(f"--queries: {exc}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"--queries line {n}: invalid JSON: {exc.msg}") from None
        try:
            out.append(ti.parse_query(obj))
        except InputError as exc:
            raise InputError(f"--queries line {n}: {exc}") from None
    return out


def _online_flag_query(
    src_endpoint: str | None, dst_endpoint: str | None, *flags: Any
) -> dict[str, Any]:
    """A query for the agent; ``--src/--dst-endpoint`` stand in for labels and IP."""
    from flagella.cli._online import query_json

    src_labels, src_ip, dst_labels, dst_ip, *rest = flags
    placeholder = "reserved:unmanaged"  # replaced by the agent with the endpoint's own
    q = _flag_query(
        src_labels or (placeholder if src_endpoint else None), src_ip,
        dst_labels or (placeholder if dst_endpoint else None), dst_ip, *rest,
    )
    out = query_json(q)
    if src_endpoint:
        out["src"] = {"endpoint": src_endpoint}
    if dst_endpoint:
        out["dst"] = {"endpoint": dst_endpoint}
    return out


def _flag_query(
    src_labels: str | None, src_ip: str | None, dst_labels: str | None, dst_ip: str | None,
    dst_named_port: list[str], dport: str | None,
    http_method: str | None, http_path: str | None, http_header: list[str],
    kafka_api_key: str | None, kafka_api_version: int | None, kafka_topic: str | None,
    kafka_client_id: str | None,
) -> TraceQuery:
    if not (src_labels or src_ip):
        raise InputError("--src-labels or --src-ip is required")
    if not (dst_labels or dst_ip):
        raise InputError("--dst-labels or --dst-ip is required")
    src = Side(
        labels=ti.parse_label_list(src_labels, "--src-labels") if src_labels else None,
        ip=ti.parse_ip(src_ip, "--src-ip") if src_ip else None,
    )
    dst = Side(
        labels=ti.parse_label_list(dst_labels, "--dst-labels") if dst_labels else None,
        ip=ti.parse_ip(dst_ip, "--dst-ip") if dst_ip else None,
        named_ports=ti.parse_named_ports(dst_named_port, "--dst-named-port"),
    )
    http = None
    if http_method or http_path or http_header:
        http = ti.parse_http(
            {
                "method": http_method or "GET",
                "path": http_path or "/",
                "headers": ti.parse_headers(http_header, "--http-header"),
            }
        )
    kafka: tuple[Any, ...] = ()
    if kafka_api_key is not None or kafka_topic is not None:
        kafka = (
            ti.parse_kafka(
                {
                    "api_key": kafka_api_key if kafka_api_key is not None else "produce",
                    "api_version": kafka_api_version or 0,
                    "topic": kafka_topic,
                    "client_id": kafka_client_id or "",
                },
                "--kafka",
            ),
        )
    return TraceQuery(
        src=src,
        dst=dst,
        dport=ti.parse_port(dport, "--dport") if dport else None,
        http=http,
        kafka=kafka,
    )


def main() -> None:
    try:
        app()
    except FlagellaError as exc:
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(2 if isinstance(exc, InputError) else 1)


from flagella.cli._commands import register as _register  # noqa: E402

_register(app, policy_app)
