"""The embedded identity store: one SQLite file in the agent's state dir.

Each call is one transaction (``BEGIN IMMEDIATE``), so two processes
sharing the file never hand out the same id twice, and a crash between
calls loses nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from flagella.identity._allocator import MAX_IDENTITY, IdentityExhausted

SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id INTEGER PRIMARY KEY,
    labels TEXT NOT NULL UNIQUE,
    refs INTEGER NOT NULL
);
"""


class SQLiteBackend:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(
            self.path, isolation_level=None, timeout=10.0, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def lookup(self, key: str) -> int | None:
        row = self._db.execute("SELECT id FROM identities WHERE labels = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def get(self, ident: int) -> str | None:
        row = self._db.execute("SELECT labels FROM identities WHERE id = ?", (ident,)).fetchone()
        return None if row is None else str(row[0])

    def acquire(self, key: str, lowest_free_from: int) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT id FROM identities WHERE labels = ?", (key,)).fetchone()
            if row is None:
                ident = self._lowest_free(lowest_free_from)
                db.execute("INSERT INTO identities (id, labels, refs) VALUES (?, ?, 1)", (ident, key))
            else:
                ident = int(row[0])
                db.execute("UPDATE identities SET refs = refs + 1 WHERE id = ?", (ident,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return ident

    def _lowest_free(self, start: int) -> int:
        row = self._db.execute(
            """
            SELECT MIN(candidate) FROM (
                SELECT ? AS candidate WHERE NOT EXISTS (SELECT 1 FROM identities WHERE id = ?)
                UNION ALL
                SELECT id + 1 FROM identities WHERE id >= ?
                    AND NOT EXISTS (SELECT 1 FROM identities i2 WHERE i2.id = identities.id + 1)
            )
            """,
            (start, start, start),
        ).fetchone()
        ident = int(row[0]) if row and row[0] is not None else start
        if ident > MAX_IDENTITY:
            raise IdentityExhausted("no free identity left")
        return ident

    def release(self, ident: int) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT refs FROM identities WHERE id = ?", (ident,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return 0
            refs = int(row[0]) - 1
            if refs <= 0:
                db.execute("DELETE FROM identities WHERE id = ?", (ident,))
                refs = 0
            else:
                db.execute("UPDATE identities SET refs = ? WHERE id = ?", (refs, ident))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return refs

    def replace_all(self, rows: dict[int, tuple[str, int]]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM identities")
            db.executemany(
                "INSERT INTO identities (id, labels, refs) VALUES (?, ?, ?)",
                [(ident, key, refs) for ident, (key, refs) in sorted(rows.items())],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def items(self) -> Iterator[tuple[int, str, int]]:
        rows = self._db.execute("SELECT id, labels, refs FROM identities ORDER BY id").fetchall()
        for ident, key, refs in rows:
            yield int(ident), str(key), int(refs)
