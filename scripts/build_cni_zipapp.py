#!/usr/bin/env python3
"""Build ``flagella-cni`` as a zipapp that runs on a node's own Python 3.11+.

The container runtime executes the plugin on the host, outside the agent's image, so
the console script of the image's venv (whose interpreter lives in the image) cannot be
installed into /opt/cni/bin. The plugin imports only the standard library and four small
modules of the package (import-linter checks it); this zips exactly those:

    python3 scripts/build_cni_zipapp.py SRC_DIR OUTPUT

SRC_DIR is the directory that holds the ``flagella`` package (``src``).
"""

from __future__ import annotations

import sys
import tempfile
import zipapp
from pathlib import Path
from shutil import copy2

MODULES = ("__init__.py", "client.py", "rpc.py", "errors.py", "cni/__init__.py", "cni/_spec.py", "cni/_plugin.py")


def build(src: Path, output: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        for module in MODULES:
            target = Path(tmp) / "flagella" / module
            target.parent.mkdir(parents=True, exist_ok=True)
            copy2(src / "flagella" / module, target)
        output.parent.mkdir(parents=True, exist_ok=True)
        zipapp.create_archive(tmp, output, interpreter="/usr/bin/env python3", main="flagella.cni:main")
    output.chmod(0o755)
    return output


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    build(Path(sys.argv[1]), Path(sys.argv[2]))
