"""The composition root: settings in, a running agent out."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any


def run(config: str | Path | None, **overrides: Any) -> None:
    from flagella.agent._logs import configure_logging
    from flagella.agent.core import AgentCore
    from flagella.agent.server import run_agent
    from flagella.agent.settings import build_identity_backend, load_settings
    from flagella.datapath.kernel import KernelDatapath, KernelSettings
    from flagella.datapath.links import LinkSettings

    settings = load_settings(config, **overrides)
    configure_logging()
    net, ct = settings.network, settings.conntrack
    links = LinkSettings(
        ipaddress.IPv4Network(net.ipv4_cidr),
        ipaddress.IPv6Network(net.ipv6_cidr) if net.ipv6_cidr else None,
        net.mtu,
        net.tunnel_overhead,
    )
    datapath = KernelDatapath(
        KernelSettings(
            settings.bpf_dir, links, ct.tcp_established_s, ct.tcp_syn_s, ct.non_tcp_s,
            ct.closing_s, settings.trace_events, settings.attach_mode,
        )
    )
    run_agent(AgentCore(settings, datapath, build_identity_backend(settings.kvstore)))
