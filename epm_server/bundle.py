"""Bundle caches: directory trees saved, listed, loaded and deleted by clients.

On disk a cache is a directory ``<parent dir>/<type>/<ID>`` (``root`` for a
cache without a parent) holding its own data in ``data`` and its children's
directories beside it, so a chain cache0 -> cache1 -> cache2 nests as
``root/<t0>/<id0>/<t1>/<id1>/<t2>/<id2>/data``. A save copies into
``root/.tmp``, fsyncs, renames the directory into place and only then
commits its record: a daemon killed at any point leaves either a complete
cache with its record or debris that ``reconcile`` removes at the next start.
"""

import collections
import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
import uuid

import structlog

from epm_server import safecopy
from epm_server.enclave import subtype_from_request
from epm_server.errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, shown)
from epm_server.ids import validate_id
from epm_server.records import Record

log = structlog.get_logger(__name__)

BUNDLE_TYPES = tuple(f"bundle-cache.occlum.cache{i}" for i in range(3))
# PickCache filter keys: the Cache fields a record has, by their wire names.
PICK_KEYS = ("ID", "subType", "size", "created", "savePath", "parentType",
             "parentID")
DATA = "data"
TMP_DIR = ".tmp"
# A parent chain longer than this is refused: three types, and some slack.
_MAX_CHAIN = 8
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class BundleCaches:
    """The three ``bundle-cache.occlum.cache*`` pools over one root and database."""

    def __init__(self, root, records, allowed_roots):
        self._root = root
        self._records = records
        self._allowed = allowed_roots
        self._lock = threading.Lock()
        # (type, ID) being saved or deleted, and how many loads or child
        # saves use a cache: a delete must not pull data from under them.
        self._busy = set()
        self._users = collections.Counter()
        os.makedirs(os.path.join(root, TMP_DIR), mode=0o700, exist_ok=True)

    def save_path(self, record):
        """The absolute path of a cache's own data."""
        return os.path.join(self._root, record.path, DATA)

    def get(self, pool_type, subtype, cache_id):
        """Return the record of a cache. Raises InvalidArgument, NotFound."""
        validate_id(cache_id)
        record = self._records.get(pool_type, cache_id)
        if record is None or (subtype and record.subtype != subtype):
            of = f" of subtype {shown(subtype, quoted=True)}" if subtype else ""
            raise NotFound(f"no {pool_type} cache {cache_id}{of}")
        return record

    def ancestors(self, record):
        """The records of ``record``'s parent chain, nearest first."""
        chain = []
        while record.parent_id and len(chain) < _MAX_CHAIN:
            record = self._records.get(record.parent_type, record.parent_id)
            if record is None:
                break
            chain.append(record)
        return chain

    def list(self, pool_type, subtype, after, limit):
        """Records in ID order after ``after``, at most ``limit`` (0: all)."""
        if limit < 0:
            raise InvalidArgument(f"limit: must not be negative, got {limit}")
        return self._records.list(pool_type, subtype, after, limit)

    def pick(self, pool_type, subtype, filters):
        """Records whose fields equal every filter. Raises InvalidArgument."""
        unknown = sorted(set(filters) - set(PICK_KEYS))
        if unknown:
            raise InvalidArgument(f"filters: unknown key {shown(unknown[0], quoted=True)}; known: "
                                  f"{', '.join(PICK_KEYS)}")
        return [r for r in self._records.list(pool_type, subtype)
                if all(self._field(r, k) == v for k, v in filters.items())]

    def _field(self, record, key):
        return str({"ID": record.id, "subType": record.subtype,
                    "size": record.size, "created": record.created,
                    "savePath": self.save_path(record),
                    "parentType": record.parent_type,
                    "parentID": record.parent_id}[key])

    def save(self, pool_type, subtype, cache_id, parent, source_path):
        """Copy ``source_path`` into a new cache; return its record.

        ``parent`` is (type, ID) or None. Raises InvalidArgument (among
        others, a source that is itself a symlink), AlreadyExists, NotFound
        (source or parent), PermissionDenied (a path outside the allowed
        roots or through a symlink).
        """
        validate_id(cache_id)
        subtype_from_request(subtype, "cache.subType")
        key = (pool_type, cache_id)
        parent_key = None
        if parent is not None:
            parent_key = (parent[0], validate_id(parent[1], "cache.parent.ID"))
        with self._claim(key, parent_key):
            if self._records.get(*key) is not None:
                raise AlreadyExists(f"{pool_type} cache {cache_id} exists already")
            prefix = ""
            if parent_key is not None:
                parent_record = self._records.get(*parent_key)
                if parent_record is None:
                    raise NotFound(f"cache.parent: no {parent_key[0]} cache "
                                   f"{parent_key[1]}")
                if len(self.ancestors(parent_record)) >= _MAX_CHAIN - 1:
                    raise InvalidArgument(f"cache.parent: chain longer than "
                                          f"{_MAX_CHAIN}")
                prefix = parent_record.path + "/"
            record = Record(pool_type, cache_id, subtype,
                            parent_key[0] if parent_key else "",
                            parent_key[1] if parent_key else "",
                            f"{prefix}{pool_type}/{cache_id}", 0, 0)
            return self._copy_in(record, source_path)

    def _copy_in(self, record, source_path):
        src_dir, name = self._allowed.open_parent(source_path, "sourcePath")
        tmp = os.open(os.path.join(self._root, TMP_DIR), _DIR)
        staged = f"{record.type}.{record.id}.{uuid.uuid4().hex}"
        placed = None
        try:
            os.mkdir(staged, 0o755, dir_fd=tmp)
            with opened_dir(staged, tmp) as staged_fd:
                size = safecopy.copy_in(src_dir, name, staged_fd, DATA,
                                        "sourcePath", shown(source_path))
                os.fsync(staged_fd)
            parent_path, own = record.path.rsplit("/", 1)
            placed = self._make_dirs(parent_path)
            if safecopy.lstat_at(placed, own) is not None:
                # Left by a save that died between rename and commit.
                log.warning("bundle_cache_debris_removed", path=record.path)
                safecopy.remove_tree(placed, own)
            os.rename(staged, own, src_dir_fd=tmp, dst_dir_fd=placed)
            os.fsync(placed)
            record = dataclasses.replace(record, size=size,
                                         created=int(time.time()))
            try:
                self._records.insert(record)
            except sqlite3.Error:
                safecopy.remove_tree(placed, own)
                raise
        except BaseException:
            safecopy.remove_tree(tmp, staged)
            raise
        finally:
            for fd in (src_dir, tmp, placed):
                if fd is not None:
                    os.close(fd)
        log.info("bundle_cache_saved", type=record.type, id=record.id,
                 size=record.size, path=record.path)
        return record

    def load(self, pool_type, subtype, cache_id, target_path):
        """Copy a cache's data to ``target_path``; return the bytes copied.

        ``target_path`` is created, or an existing directory merged into.
        Raises InvalidArgument (among others, an existing file or symlink
        at ``target_path``), NotFound, PermissionDenied, FailedPrecondition.
        """
        record = self.get(pool_type, subtype, cache_id)
        with self._use((pool_type, cache_id)):
            dst_dir, name = self._allowed.open_parent(target_path, "targetPath")
            try:
                with opened_dir(os.path.join(self._root, record.path)) as cache_fd:
                    return safecopy.copy_out(cache_fd, DATA, dst_dir, name,
                                             "targetPath", shown(target_path))
            finally:
                os.close(dst_dir)

    def delete(self, pool_type, subtype, cache_id):
        """Remove a cache's record and data. Raises NotFound, FailedPrecondition.

        A cache with children is refused: their data lives inside its
        directory, and they would be left with a parent that is gone.
        """
        record = self.get(pool_type, subtype, cache_id)
        key = (pool_type, cache_id)
        with self._claim(key, None, exclusive=True):
            children = self._records.children(*key)
            if children:
                raise FailedPrecondition(
                    f"{pool_type} cache {cache_id} has {len(children)} child "
                    f"caches (first: {children[0].type} {children[0].id}); "
                    "delete them first")
            # Record first: a crash before the data goes leaves debris that
            # reconcile removes, never a record naming missing data.
            self._records.delete(*key)
            parent_path, own = record.path.rsplit("/", 1)
            with opened_dir(os.path.join(self._root, parent_path)) as parent_fd:
                safecopy.remove_tree(parent_fd, own)
        log.info("bundle_cache_deleted", type=pool_type, id=cache_id)

    def _make_dirs(self, relative):
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in relative.split("/"):
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(name, _DIR, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _claim(self, key, parent_key, exclusive=False):
        """Own ``key`` for a save or delete, and use ``parent_key`` meanwhile."""
        with self._lock:
            if key in self._busy and not exclusive:
                raise AlreadyExists(f"{key[0]} cache {key[1]} is being saved "
                                    "by another call")
            if key in self._busy or self._users[key]:
                raise FailedPrecondition(f"{key[0]} cache {key[1]} is being saved, "
                                         "loaded or deleted by another call")
            if parent_key is not None and parent_key in self._busy:
                raise FailedPrecondition(f"cache.parent: {parent_key[1]} is being "
                                         "saved or deleted by another call")
            self._busy.add(key)
            if parent_key is not None:
                self._users[parent_key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(key)
                if parent_key is not None:
                    self._users[parent_key] -= 1
                    if not self._users[parent_key]:
                        del self._users[parent_key]

    @contextlib.contextmanager
    def _use(self, key):
        with self._lock:
            if key in self._busy:
                raise FailedPrecondition(f"{key[0]} cache {key[1]} is being "
                                         "deleted by another call")
            self._users[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]


@contextlib.contextmanager
def opened_dir(path, dir_fd=None):
    """Open a directory without following a symlink; close it on exit."""
    fd = os.open(path, _DIR, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)
