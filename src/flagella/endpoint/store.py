"""Endpoint records on disk: one JSON file per endpoint in the state dir.

Writes are atomic (write a temporary file, fsync, rename), so a crash
leaves either the old record or the new one. A write that only reports
progress (the regeneration state, the realized revision: restore recomputes
both) may skip the fsync (``durable=False``): still atomic, and after a crash
the record is the old one or the new one, but it costs no disk flush per
regeneration (an fsync costs ~0.8 ms here, and a policy change regenerates
every endpoint it selects). :meth:`EndpointStore.save_later` goes further: a
writer thread persists such progress after the fact, one write per endpoint
however many changes came meanwhile, so a regeneration never waits for a disk.
A durable save or a delete cancels the endpoint's pending write (file writes
and the pending set share a lock: a deleted record is never written again). A record is written *before*
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
        #: Held across every file write and delete (then ``_cond``, never the reverse).
        self._io = threading.Lock()
        self._cond = threading.Condition()
        self._pending: dict[int, Endpoint] = {}
        self._writer: threading.Thread | None = None

    def _path(self, ep_id: int) -> Path:
        return self.dir / f"{ep_id}.json"

    def save(self, ep: Endpoint, durable: bool = True) -> None:
        with self._io:
            with self._cond:
                self._pending.pop(ep.id, None)  # this write supersedes it
            self._write(ep, durable)

    def save_later(self, ep: Endpoint) -> None:
        """Persist ``ep`` soon, not durably, from the writer thread (progress only)."""
        with self._cond:
            self._pending[ep.id] = ep
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_pending, name="flagella-endpoint-store", daemon=True)
                self._writer.start()
            self._cond.notify()

    def flush(self) -> None:
        """Write every pending record now (agent stop, tests)."""
        while self._write_one():
            pass

    def _write_pending(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._cond.wait_for(lambda: bool(self._pending), timeout=5.0):
                    self._writer = None  # idle: the next save_later starts another
                    return
            self._write_one()

    def _write_one(self) -> bool:
        with self._io:
            with self._cond:
                if not self._pending:
                    return False
                _, ep = self._pending.popitem()
            self._write(ep, False)
            return True

    def _write(self, ep: Endpoint, durable: bool) -> None:
        path = self._path(ep.id)
        # One temporary file per writer: the regeneration workers and the API may
        # save the same endpoint at once, and the last rename wins whole.
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(ep.to_json(), f, sort_keys=True)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def delete(self, ep_id: int) -> None:
        with self._io:
            with self._cond:
                self._pending.pop(ep_id, None)
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
