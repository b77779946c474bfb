"""The composition root: settings in, a running agent out."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flagella.datapath.redirect import RedirectSettings
    from flagella.proxy.ports import ProxySettings


def run(config: str | Path | None, **overrides: Any) -> None:
    from flagella.agent._logs import configure_logging
    from flagella.agent.core import AgentCore
    from flagella.agent.server import run_agent
    from flagella.agent.settings import build_identity_backend, load_settings
    from flagella.datapath.kernel import KernelDatapath, KernelSettings
    from flagella.datapath.links import LinkSettings

    settings = load_settings(config, **overrides)
    configure_logging()
    k8s_api = None
    if settings.k8s.enabled:  # a bad kubeconfig fails here, before the kernel is touched
        from flagella.k8s import api_client

        k8s_api = api_client(kubeconfig=settings.k8s.kubeconfig)
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
            _redirect_settings(settings.proxy), local_delivery=settings.local_delivery,
        )
    )
    proxy = None
    if settings.proxy.enabled:
        from prometheus_client import REGISTRY

        from flagella.agent.proxy import NodeProxy

        proxy = NodeProxy(settings, REGISTRY if settings.metrics_addr else None)
    istio = None
    if settings.istio.enabled:
        from flagella.agent.istio import IstioSidecars

        istio = IstioSidecars.for_agent(settings, proxy)
    core = AgentCore(
        settings, datapath, build_identity_backend(settings.kvstore),
        enforcers=[proxy.enforcer] if proxy else [],
        with_kernel=[istio.enforcer] if istio else [],
    )
    if proxy is not None:
        core.ipcache_listeners.append(proxy.set_ipcache)
    if istio is not None:
        sidecars = istio
        core.ipcache_listeners.append(lambda desired: sidecars.set_ipcache(desired, core.engine.identities()))
    run_agent(core, proxy, k8s_api, istio)


def _redirect_settings(proxy: ProxySettings) -> RedirectSettings | None:
    """The datapath's redirect plumbing for the proxy settings (None when the proxy is off)."""
    from flagella.datapath.redirect import RedirectSettings

    if not proxy.enabled:
        return None
    return RedirectSettings(
        proxy.ingress_port, proxy.egress_port, nft_table=proxy.nft_table,
        reentry_ifname=proxy.reentry_ifname, reentry_peer=proxy.reentry_peer,
    )
