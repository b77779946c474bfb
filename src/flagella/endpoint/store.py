"""Endpoint records on disk: one JSON file per endpoint in the state dir.

Writes are atomic (write a temporary file, fsync, rename), so a crash
leaves either the old record or the new one. A record is written *before*
the kernel objects of an endpoint are created (state ``init``) and removed
*after* they are gone, so that after a crash the next start knows what may
be left over and can finish or undo it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from flagella.endpoint.model import Endpoint


class EndpointStore:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # records name every pod: root's alone

    def _path(self, ep_id: int) -> Path:
        return self.dir / f"{ep_id}.json"

    def save(self, ep: Endpoint) -> None:
        path = self._path(ep.id)
        # One temporary file per writer: the regeneration workers and the API may
        # save the same endpoint at once, and the last rename wins whole.
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(ep.to_json(), f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def delete(self, ep_id: int) -> None:
        self._path(ep_id).unlink(missing_ok=True)

    def load_all(self) -> list[Endpoint]:
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(Endpoint.from_json(json.loads(path.read_text())))
            except (ValueError, KeyError, TypeError):
                path.rename(path.with_suffix(".corrupt"))
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        return out
