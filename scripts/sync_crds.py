#!/usr/bin/env python3
"""Copy the Cilium CRDs from ../shared/schemas/cilium/ into manifests/crds/.

The CRDs (their OpenAPI v3 schemas included) are Cilium's own; Flagella ships
them unchanged so that CiliumNetworkPolicy objects written for Cilium are
accepted by the API server as they are. ``tests/k8s/test_manifests.py`` fails
when the copies drift from the source; run this script to bring them back:

    python3 scripts/sync_crds.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT.parent / "shared" / "schemas" / "cilium"
TARGET = ROOT / "manifests" / "crds"
NAMES = ("ciliumnetworkpolicies.yaml", "ciliumclusterwidenetworkpolicies.yaml")


def stale() -> list[str]:
    """Names whose copy in manifests/crds/ differs from the source."""
    return [n for n in NAMES if not (TARGET / n).is_file()
            or (TARGET / n).read_bytes() != (SOURCE / n).read_bytes()]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad = stale()
        for n in bad:
            print(f"manifests/crds/{n}: out of sync with {SOURCE / n}", file=sys.stderr)
        return 1 if bad else 0
    TARGET.mkdir(parents=True, exist_ok=True)
    for n in NAMES:
        (TARGET / n).write_bytes((SOURCE / n).read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
