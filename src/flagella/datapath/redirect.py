"""Host plumbing that hands redirected flows to the node proxy, keeping their addresses.

Theory of operation (DESIGN.md, "Redirect to the proxy" and "Ingress redirect",
both measured here with Envoy 1.40 on this kernel):

* The tc programs decide. A packet whose policy verdict is REDIRECT carries
  ``skb->mark = 0x200 | proxy_port << 16``. On a pod's egress (``from_pod``, the
  host veth's ingress) the packet is already entering the host's stack. On a
  pod's ingress (``to_pod``, the host veth's egress) it is about to leave the
  host into the pod, where the mark would be lost, so the program redirects it
  to the ingress side of the *re-entry* device, a veth pair of our own with no
  addresses, and it enters the host's prerouting a second time, mark intact.
* nftables prerouting (priority mangle) then, per proxy port, sends marked TCP
  to the proxy's transparent listener with ``tproxy`` (no address is rewritten:
  the listener sees the real source and, through ``original_dst``, the real
  destination), and marks packets of flows that already have a transparent
  socket (``socket transparent 1``) ``0x300`` so they are delivered to it.
* Policy routing delivers both locally: ``fwmark 0x200/0xf00`` and
  ``fwmark 0x300/0xf00`` look up a table that holds ``local 0.0.0.0/0`` and
  ``local ::/0`` on lo. One rule before them sends Envoy's own packets (its
  upstream sockets carry ``SO_MARK 0x300``, ``iif lo`` for locally generated
  traffic) through the main table, to the real destination, so they never
  loop back into Envoy.
* The datapath never redirects a packet that already carries ``0x300``, and
  the host-mark rule (``kernel.install_host_mark``) leaves such packets
  alone: Envoy's upstream is the peer itself (``original_src``), not the host.

Everything lives in one nftables table and a fixed set of rule priorities,
so `install` is idempotent and `remove` undoes it completely.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from flagella.errors import DatapathError

MARK_MASK = 0xF00
MARK_TO_PROXY = 0x200
MARK_FROM_PROXY = 0x300


@dataclass(frozen=True)
class RedirectSettings:
    """Where redirected flows go; the proxy package owns the port numbers."""

    ingress_port: int
    egress_port: int
    nft_table: str = "flagella_proxy"
    route_table: int = 2004
    #: Priority of the first of the three policy-routing rules (they use three in a row).
    rule_pref: int = 97
    #: The re-entry veth pair: the datapath redirects into ``reentry_ifname``'s ingress.
    reentry_ifname: str = "flreentry0"
    reentry_peer: str = "flreentry1"

    def __post_init__(self) -> None:
        for name, port in (("ingress_port", self.ingress_port), ("egress_port", self.egress_port)):
            if not 1 <= port <= 65535:
                raise DatapathError(f"redirect.{name}: {port} must be 1-65535")


def proxy_mark(port: int) -> int:
    """The mark the datapath puts on a packet redirected to ``port``."""
    return MARK_TO_PROXY | (port << 16)


def _run(*cmd: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DatapathError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def nft_rules(s: RedirectSettings) -> str:
    lines = []
    for port in sorted({s.ingress_port, s.egress_port}):
        mark = proxy_mark(port)
        for family, addr in (("ip", "127.0.0.1"), ("ip6", "[::1]")):
            lines.append(
                f"    meta nfproto {'ipv4' if family == 'ip' else 'ipv6'} meta l4proto tcp "
                f"meta mark & 0xffff0f00 == {mark:#x} tproxy {family} to {addr}:{port} accept"
            )
    return f"""
table inet {s.nft_table} {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set meta mark & 0xfffff0ff | {MARK_FROM_PROXY:#x} accept
{chr(10).join(lines)}
  }}
}}
"""


def _rules(s: RedirectSettings) -> list[list[str]]:
    """The policy-routing rules, per family, in priority order."""
    t = str(s.route_table)
    return [
        ["pref", str(s.rule_pref), "iif", "lo", "fwmark", f"{MARK_FROM_PROXY:#x}/{MARK_MASK:#x}", "lookup", "main"],
        ["pref", str(s.rule_pref + 1), "fwmark", f"{MARK_FROM_PROXY:#x}/{MARK_MASK:#x}", "lookup", t],
        ["pref", str(s.rule_pref + 2), "fwmark", f"{MARK_TO_PROXY:#x}/{MARK_MASK:#x}", "lookup", t],
    ]


@dataclass(frozen=True)
class Reentry:
    """The re-entry device as the datapath's config map needs it."""

    ifindex: int
    mac: bytes


def reentry_device(ifname: str) -> Reentry:
    """Ask netlink (not sysfs, which shows the namespace it was mounted in)."""
    out = json.loads(_run("ip", "-j", "link", "show", "dev", ifname).stdout)
    return Reentry(int(out[0]["ifindex"]), bytes.fromhex(out[0]["address"].replace(":", "")))


def install(s: RedirectSettings) -> Reentry:
    """Install (or repair) the plumbing; return the re-entry device."""
    if _run("ip", "link", "show", s.reentry_ifname, check=False).returncode != 0:
        _run("ip", "link", "add", s.reentry_ifname, "type", "veth", "peer", "name", s.reentry_peer)
    for dev in ("lo", s.reentry_ifname, s.reentry_peer):
        _run("ip", "link", "set", dev, "up")
    for key, value in (("rp_filter", "0"), ("accept_local", "1")):
        _run("sysctl", "-qw", f"net.ipv4.conf.{s.reentry_ifname}.{key}={value}")
    _run("sysctl", "-qw", f"net.ipv6.conf.{s.reentry_ifname}.disable_ipv6=0", check=False)
    _run("nft", "delete", "table", "inet", s.nft_table, check=False)
    _run("nft", "-f", "-", stdin=nft_rules(s))
    for family in ("-4", "-6"):
        everything = "0.0.0.0/0" if family == "-4" else "::/0"
        _run("ip", family, "route", "replace", "local", everything, "dev", "lo", "table", str(s.route_table))
        for rule in _rules(s):
            while _run("ip", family, "rule", "del", "pref", rule[1], check=False).returncode == 0:
                pass
            _run("ip", family, "rule", "add", *rule)
    return reentry_device(s.reentry_ifname)


def remove(s: RedirectSettings) -> None:
    """Undo `install`; safe to repeat."""
    _run("nft", "delete", "table", "inet", s.nft_table, check=False)
    for family in ("-4", "-6"):
        for rule in _rules(s):
            while _run("ip", family, "rule", "del", "pref", rule[1], check=False).returncode == 0:
                pass
        _run("ip", family, "route", "flush", "table", str(s.route_table), check=False)
    _run("ip", "link", "del", s.reentry_ifname, check=False)


__all__ = [
    "MARK_FROM_PROXY",
    "MARK_MASK",
    "MARK_TO_PROXY",
    "RedirectSettings",
    "Reentry",
    "install",
    "nft_rules",
    "proxy_mark",
    "reentry_device",
    "remove",
]
