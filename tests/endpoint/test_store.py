"""Endpoint records: durable saves, progress written later by a thread, deletes that stick."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flagella.endpoint.lifecycle import State
from flagella.endpoint.model import Endpoint
from flagella.endpoint.store import EndpointStore


def endpoint(ep_id: int = 7) -> Endpoint:
    return Endpoint(id=ep_id, name="a", namespace="default", labels={"app": "a"}, ifindex=100, identity=300)


def record(tmp_path: Path, ep_id: int = 7) -> dict:  # type: ignore[type-arg]
    return json.loads((tmp_path / f"{ep_id}.json").read_text())  # type: ignore[no-any-return]


def test_save_later_writes_the_newest_state_once_flushed(tmp_path: Path) -> None:
    store = EndpointStore(tmp_path)
    ep = endpoint()
    store.save(ep)
    ep.set_state(State.WAITING_FOR_IDENTITY)
    store.save_later(ep)
    ep.policy_revision = 5
    store.save_later(ep)  # coalesces with the one before
    store.flush()
    assert record(tmp_path)["policy_revision"] == 5
    assert record(tmp_path)["state"] == State.WAITING_FOR_IDENTITY.value
    assert [e.id for e in store.load_all()] == [7]


def test_the_writer_thread_writes_without_a_flush(tmp_path: Path) -> None:
    store = EndpointStore(tmp_path)
    ep = endpoint()
    ep.policy_revision = 3
    store.save_later(ep)
    deadline = time.monotonic() + 10
    while not (tmp_path / "7.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert record(tmp_path)["policy_revision"] == 3


def test_a_delete_cancels_a_pending_write(tmp_path: Path) -> None:
    store = EndpointStore(tmp_path)
    ep = endpoint()
    store.save(ep)
    with store._io:  # the writer thread cannot write before the delete
        store.save_later(ep)
    store.delete(ep.id)
    store.flush()
    assert not (tmp_path / "7.json").exists() and store.load_all() == []
