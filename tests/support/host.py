"""The host under the root tests: where things are, what must be there, and netguard.

Theory of operation
-------------------
Every suite that builds network namespaces (datapath, system, e2e, links) starts from
here, so the rules live in one place:

* **Paths.** ``shared/`` sits beside the repository (``REPO.parent / "shared"``, the
  same in a worktree and in CI's fresh clone); nothing is found by an absolute path.
  `SHARED`, `NETGUARD`, `CONFORMANCE` and `SCHEMAS` derive from it. `FLAGELLA` is the
  ``flagella`` script of the interpreter running the tests, so agents run the sources
  on ``PYTHONPATH``.
* **What the host lacks raises `HostUnavailable`.** `require` checks root, bcc,
  command-line tools and netguard, and raises with the missing thing named. The hook
  in ``tests/conftest.py`` turns that exception into a skip, or into a failure when
  ``FLAGELLA_REQUIRE_ROOT_TESTS=1`` (CI): there, whatever is missing is a defect of
  the machine and the real checks must not silently not run. No skip reason is ever
  matched by its words.
* **`SctpUnavailable`** is the one named exception that stays a skip everywhere: this
  kernel has no SCTP, so probes that are only SCTP cannot run.
* **netguard first.** `prepare` requires the tools, turns ``netguard on`` (nothing a
  namespace sends is forwarded off the machine) and is called before any namespace
  is made. Callers then create namespaces with names carrying their pid and remove
  them in ``finally`` blocks; `sweep_stale` removes what runs that died left.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
NETGUARD = SHARED / "tools" / "netguard"
CONFORMANCE = SHARED / "conformance"
SCHEMAS = SHARED / "schemas" / "cilium"
FLAGELLA = str(Path(sys.executable).parent / "flagella")
PYTHON = sys.executable

#: The environment variable under which a root test may not skip (set by ``.ci/run``).
REQUIRE_ROOT_TESTS = "FLAGELLA_REQUIRE_ROOT_TESTS"


class HostUnavailable(Exception):
    """This host lacks something a root test needs (root, bcc, a tool, netguard)."""


class SctpUnavailable(Exception):
    """The test needs SCTP, which this kernel does not have: a skip even on CI."""


def root_tests_required() -> bool:
    return os.environ.get(REQUIRE_ROOT_TESTS) == "1"


def require(*tools: str, bcc: bool = False, flagella: bool = False) -> None:
    """Raise `HostUnavailable` unless this is root with netguard, these tools (and bcc)."""
    if os.geteuid() != 0:
        raise HostUnavailable("needs root (network namespaces, tc, bpf)")
    if not NETGUARD.exists():
        raise HostUnavailable(f"netguard not found at {NETGUARD} (../shared beside the repository)")
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        raise HostUnavailable(f"needs {', '.join(missing)} on PATH")
    if bcc and importlib.util.find_spec("bcc") is None:
        raise HostUnavailable("needs bcc (python3-bpfcc)")
    if flagella and not Path(FLAGELLA).exists():
        raise HostUnavailable(f"{FLAGELLA} is missing (make venv)")


def netguard_on() -> None:
    """Nothing may be forwarded off the machine: call before any namespace is made."""
    if not NETGUARD.exists():
        raise HostUnavailable(f"netguard not found at {NETGUARD}")
    sh("sh", str(NETGUARD), "on")


def prepare(*tools: str, bcc: bool = False, flagella: bool = False) -> None:
    """`require` these, then turn netguard on: the first step of every namespace fixture."""
    require(*tools, bcc=bcc, flagella=flagella)
    netguard_on()


def sh(
    *cmd: str, netns: str | None = None, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command (inside ``netns`` if given); raise RuntimeError with its stderr on failure."""
    argv = list(cmd) if netns is None else ["ip", "netns", "exec", netns, *cmd]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def netns_names() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()}


def sweep_stale(netns: str, bpf_dirs: str = "", links: str = "") -> list[str]:
    """Remove namespaces (and bpf dirs, root-namespace links) of test runs whose process died.

    Each argument is a regular expression whose first group is the owner's pid:
    ``netns`` matched against namespace names, ``bpf_dirs`` against names under
    ``/sys/fs/bpf``, ``links`` against interface names of the root namespace.
    """
    removed: list[str] = []
    for name in sorted(netns_names()):
        m = re.fullmatch(netns, name)
        if m and not pid_alive(int(m.group(1))):
            sh("ip", "netns", "del", name, check=False)
            removed.append(f"netns {name}")
    if links:
        for link in json.loads(sh("ip", "-j", "link", "show", check=False).stdout or "[]"):
            m = re.fullmatch(links, link.get("ifname", ""))
            if m and not pid_alive(int(m.group(1))):
                sh("ip", "link", "del", link["ifname"], check=False)
                removed.append(f"link {link['ifname']}")
    if bpf_dirs:
        for d in Path("/sys/fs/bpf").iterdir():
            m = re.fullmatch(bpf_dirs, d.name)
            if m and not pid_alive(int(m.group(1))):
                remove_bpf_dir(d)
                removed.append(f"bpf dir {d}")
    return removed


def remove_bpf_dir(path: Path) -> None:
    """Unpin everything under ``path`` and remove it."""
    from flagella.datapath.loader import remove_pins

    if path.exists():
        remove_pins(path)
    shutil.rmtree(path, ignore_errors=True)


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; raise AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def outcome_of_unavailable(exc: BaseException) -> tuple[str, str] | None:
    """("skipped" | "failed", message) for a host exception, None for any other exception."""
    if isinstance(exc, SctpUnavailable):
        return "skipped", f"SCTP is not built into this kernel: {exc}"
    if isinstance(exc, HostUnavailable):
        if root_tests_required():
            return "failed", f"{REQUIRE_ROOT_TESTS}=1 and the host lacks what a root test needs: {exc}"
        return "skipped", str(exc)
    return None


__all__ = [
    "CONFORMANCE",
    "FLAGELLA",
    "NETGUARD",
    "PYTHON",
    "REPO",
    "SCHEMAS",
    "SHARED",
    "HostUnavailable",
    "SctpUnavailable",
    "netguard_on",
    "netns_names",
    "outcome_of_unavailable",
    "pid_alive",
    "prepare",
    "remove_bpf_dir",
    "require",
    "root_tests_required",
    "sh",
    "sweep_stale",
    "wait_until",
]
