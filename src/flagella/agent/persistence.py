"""The agent's state files: policies and namespace labels, as atomic JSON files.

Endpoint records have their own store (`flagella.endpoint.store`); identities
live in the allocator's backend. Every write goes to a temporary file, is
fsynced and renamed over the old one (mode 0600: state names every pod and policy), so a crash leaves the old file or the new
one, never a torn one. A missing file reads as its default.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["StateFiles"]

POLICIES = "policies.json"
NAMESPACES = "namespaces.json"
ENDPOINT_IDS = "endpoint_ids.json"


class StateFiles:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    def write(self, name: str, obj: Any) -> None:
        path = self.dir / name
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(obj, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def read(self, name: str, default: Any) -> Any:
        try:
            return json.loads((self.dir / name).read_text())
        except FileNotFoundError:
            return default

    def save_policies(self, revision: int, documents: list[Any]) -> None:
        self.write(POLICIES, {"revision": revision, "documents": documents})

    def load_policies(self) -> tuple[int, list[Any]]:
        saved = self.read(POLICIES, {"revision": 1, "documents": []})
        return int(saved.get("revision", 1)), list(saved.get("documents", []))

    def save_namespaces(self, labels: dict[str, dict[str, str]]) -> None:
        self.write(NAMESPACES, labels)

    def load_namespaces(self) -> dict[str, dict[str, str]]:
        return {str(k): dict(v) for k, v in self.read(NAMESPACES, {}).items()}

    def save_last_endpoint_id(self, n: int) -> None:
        self.write(ENDPOINT_IDS, {"last": n})

    def load_last_endpoint_id(self) -> int:
        return int(self.read(ENDPOINT_IDS, {}).get("last", 0))
