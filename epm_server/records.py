"""The bundle caches' records in sqlite3 (``db_path``), one row per cache.

A row is written only after its data is renamed into place, so a row always
names data that was complete when it was committed; the start-up reconcile
in ``bundle`` handles the reverse (data that lost its row, or a row whose
data an operator removed).
"""

import dataclasses
import os
import sqlite3
import threading

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bundle_cache (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    subtype TEXT NOT NULL,
    parent_type TEXT NOT NULL DEFAULT '',
    parent_id TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (type, id)
)
"""
_COLUMNS = "type, id, subtype, parent_type, parent_id, path, size, created"


@dataclasses.dataclass(frozen=True)
class Record:
    """One bundle cache; ``path`` is its directory relative to the root."""

    type: str
    id: str
    subtype: str
    parent_type: str
    parent_id: str
    path: str
    size: int
    created: int


class Records:
    """Thread-safe access to the records; each call is one transaction."""

    def __init__(self, db_path, timeout):
        os.makedirs(os.path.dirname(db_path) or ".", mode=0o700, exist_ok=True)
        self._db = sqlite3.connect(db_path, timeout=timeout,
                                   check_same_thread=False, isolation_level=None)
        # FULL: a committed record survives a power cut, like its data.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        # sqlite3 connections are not safe across threads without a lock.
        self._lock = threading.Lock()

    def close(self):
        with self._lock:
            self._db.close()

    def get(self, pool_type, cache_id):
        """The record of (type, ID), or None."""
        rows = self._query(f"SELECT {_COLUMNS} FROM bundle_cache "
                           "WHERE type = ? AND id = ?", (pool_type, cache_id))
        return rows[0] if rows else None

    def list(self, pool_type=None, subtype="", after="", limit=0):
        """Records in ID order with ID > ``after``; ``limit`` 0 means all."""
        sql = f"SELECT {_COLUMNS} FROM bundle_cache WHERE id > ?"
        args = [after]
        if pool_type is not None:
            sql += " AND type = ?"
            args.append(pool_type)
        if subtype:
            sql += " AND subtype = ?"
            args.append(subtype)
        sql += " ORDER BY id, type"
        if limit > 0:
            sql += " LIMIT ?"
            args.append(limit)
        return self._query(sql, args)

    def children(self, pool_type, cache_id):
        """Records whose parent is (type, ID)."""
        return self._query(f"SELECT {_COLUMNS} FROM bundle_cache "
                           "WHERE parent_type = ? AND parent_id = ?",
                           (pool_type, cache_id))

    def insert(self, record):
        """Commit a new record. Raises sqlite3.IntegrityError when it exists."""
        values = dataclasses.astuple(record)
        with self._lock:
            self._db.execute(f"INSERT INTO bundle_cache ({_COLUMNS}) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)

    def delete(self, pool_type, cache_id):
        """Remove the record of (type, ID), if any."""
        with self._lock:
            self._db.execute("DELETE FROM bundle_cache WHERE type = ? AND id = ?",
                             (pool_type, cache_id))

    def _query(self, sql, args):
        with self._lock:
            return [Record(*row) for row in self._db.execute(sql, args)]
