"""The proxy-redirect plumbing, installed for real in a private network namespace."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from flagella.datapath import redirect
from flagella.errors import DatapathError

pytestmark = pytest.mark.root


def _in_netns(ns: str, code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), "src"]))}
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def netns() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"fl-rd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_install_is_idempotent_and_remove_is_complete(netns: str) -> None:
    out = _in_netns(netns, """
import subprocess
from flagella.datapath import redirect as r
s = r.RedirectSettings(15001, 15002)
first, second = r.install(s), r.install(s)
assert first == second
def sh(*c): return subprocess.run(c, capture_output=True, text=True, check=True).stdout
print("NFT", sh("nft", "list", "table", "inet", s.nft_table))
print("RULES4", sh("ip", "-4", "rule"))
print("RULES6", sh("ip", "-6", "rule"))
print("ROUTES", sh("ip", "-6", "route", "show", "table", str(s.route_table)), sh("ip", "route", "show", "table", str(s.route_table)))
r.remove(s); r.remove(s)
print("AFTER", sh("nft", "list", "ruleset"), sh("ip", "rule"), sh("ip", "link"))
""")
    nft, rest = out.split("RULES4", 1)
    assert "tproxy ip to 127.0.0.1:15001" in nft and "tproxy ip6 to [::1]:15002" in nft
    assert f"{redirect.proxy_mark(15001):#010x}" in nft  # the mark the datapath sets
    assert "socket transparent 1" in nft
    rules4, rest = rest.split("RULES6", 1)
    rules6, rest = rest.split("ROUTES", 1)
    for rules in (rules4, rules6):
        assert rules.count("fwmark 0x300/0xf00") == 2 and "iif lo lookup main" in rules
        assert "fwmark 0x200/0xf00 lookup 2004" in rules
    routes, after = rest.split("AFTER", 1)
    assert routes.count("local default dev lo") == 2  # IPv6 and IPv4
    assert "flagella_proxy" not in after and "2004" not in after and "flreentry" not in after


def test_ports_are_validated() -> None:
    with pytest.raises(DatapathError, match="ingress_port"):
        redirect.RedirectSettings(0, 15002)
