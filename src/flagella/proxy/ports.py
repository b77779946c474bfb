"""Where the node proxy listens: one transparent listener per direction.

The proxy package owns these numbers. The agent writes them into the kernel
policy map (the value of a REDIRECT key carries its direction's port, which
the datapath turns into the mark ``0x200 | port << 16``) and into the host
plumbing (one nftables ``tproxy`` rule per port), and the proxy's listeners
bind them. The two directions use different ports so that a flow redirected
on egress and then again on ingress (it cannot be: see
``flagella.datapath.redirect``) could never be confused with the other.

Pure: settings only.
"""

from __future__ import annotations

from dataclasses import dataclass

from flagella.errors import InputError

INGRESS_PORT = 15001
EGRESS_PORT = 15002


@dataclass(frozen=True)
class ProxySettings:
    """The ``proxy`` group of the agent settings: the node proxy (the xDS server and
    the one Envoy it feeds) and the datapath plumbing that hands it flows. When
    enabled, the xDS enforcer runs before the kernel's (a port is redirected only
    after Envoy ACKed its listener and policy)."""

    #: Install the redirect plumbing (re-entry device, nftables, policy routing) and
    #: tell the datapath about it. Off: REDIRECT verdicts only mark and pass (no L7).
    #: On by default: a policy's HTTP rules are a security promise, as in Cilium.
    enabled: bool = True
    ingress_port: int = INGRESS_PORT
    egress_port: int = EGRESS_PORT
    reentry_ifname: str = "flreentry0"
    reentry_peer: str = "flreentry1"
    nft_table: str = "flagella_proxy"
    #: Envoy's shared-memory base id (unique per Envoy on the host) and admin port (127.0.0.1).
    envoy_base_id: int = 15000
    admin_port: int = 15000
    #: The xDS (and access-log) socket; default: <state_dir>/xds.sock, mode 0660.
    xds_socket: str = ""
    #: Start Envoy with the agent, not when the first HTTP redirect appears.
    start_at_agent_start: bool = False
    #: Seconds an HTTP redirect waits for an Envoy to connect and ACK before it fails.
    envoy_wait_s: float = 30.0

    def port(self, egress: bool) -> int:
        return self.egress_port if egress else self.ingress_port

    def validate(self) -> ProxySettings:
        for name in ("ingress_port", "egress_port", "admin_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise InputError(f"proxy.{name}: must be 1-65535")
        if self.ingress_port == self.egress_port:
            raise InputError("proxy.egress_port: must differ from proxy.ingress_port")
        for name in ("reentry_ifname", "reentry_peer"):
            value = getattr(self, name)
            if not 1 <= len(value) <= 15 or "/" in value or " " in value:
                raise InputError(f"proxy.{name}: {value!r} is not a device name")
        if not self.nft_table.replace("_", "").isalnum():
            raise InputError(f"proxy.nft_table: {self.nft_table!r} is not a table name")
        if self.envoy_base_id < 0:
            raise InputError("proxy.envoy_base_id: must be 0 or positive")
        if not 0 < self.envoy_wait_s < float("inf"):
            raise InputError("proxy.envoy_wait_s: must be a positive number of seconds")
        return self


__all__ = ["EGRESS_PORT", "INGRESS_PORT", "ProxySettings"]
