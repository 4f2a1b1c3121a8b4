"""Pooled enclaves that outlive the daemon, in systemd's file descriptor store.

While an enclave is available, systemd holds a copy of its fd (``FDSTORE=1``,
sd_notify(3)) under the name ``epm-<entry ID>``, and a JSON file
``<root>/fdstore/<entry ID>.json`` holds what the pool knows of it: subtype,
identity, layout, creation time and origin. The metadata does not fit in the
name (an FDNAME is at most 255 characters; an identity's two hashes alone
take 128 in hex, a layout up to 64 ranges). After a restart or an upgrade,
systemd passes the fds back (``LISTEN_FDS``, ``LISTEN_FDNAMES``) and
``adopt`` checks each one like a check-in before the pool takes it.

An enclave leaves the store when it stops being available: at lease, before
its fd reaches a client, rather than at hand-out. Its metadata is removed in
the same step, so even when the ``FDSTOREREMOVE=1`` message is lost or the
daemon dies before systemd reads it, a restarted daemon finds no metadata
for the name and drops the fd: an enclave handed out once never comes back.
A failed hand-off makes the enclave available again, and it is stored again.

A clean shutdown leaves the store alone (that is what makes the pool
survive); the daemon closes only its own copies.
"""

import collections
import json
import os
import threading
import time

import structlog

from epm_server import fdcheck, systemd
from epm_server.enclave import Identity, LayoutEntry
from epm_server.errors import EpmError
from epm_server.ids import is_id
from epm_server.pool import State

log = structlog.get_logger(__name__)

NAME_PREFIX = "epm-"
METADATA_VERSION = 1
# A store message that finds systemd's queue full is tried again this often,
# this far apart, outside any lock.
_SEND_TRIES = 200
_SEND_RETRY_S = 0.01


def fd_name(entry_id):
    """The FDNAME under which systemd keeps enclave ``entry_id``'s fd."""
    return NAME_PREFIX + entry_id


class FdStore:
    """Mirrors the pool's available enclaves into systemd's fd store.

    The pool calls ``_observe`` under its lock on each change of state;
    that call only duplicates an fd and queues it, or removes an entry from
    the store (one non-blocking datagram and one unlink). A worker thread
    writes the metadata (temp file, fsync, rename) and sends the fd.
    """

    def __init__(self, pool, directory):
        self._pool = pool
        self._dir = directory
        self._cond = threading.Condition()
        self._queue = collections.deque()
        # Entry ID -> (dup of its fd, snapshot) waiting for the worker.
        self._pending = {}
        # IDs systemd holds, with their metadata on disk.
        self._stored = set()
        self._active = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fdstore",
                                        daemon=True)

    def start(self):
        """Mirror the pool from now on; does nothing outside systemd."""
        if not systemd.notifying():
            return
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        self._active = True
        self._pool.on_transition(self._observe)
        self._thread.start()

    def stop(self):
        """Send what is queued, then stop; the store keeps every fd it has."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def adopt(self, passed):
        """Put the enclaves that systemd passed back into the pool.

        ``passed`` is ``systemd.listen_fds()``: (fd, name) pairs. Each fd is
        checked like a check-in's and adopted as available with its
        metadata and ID; the rest are closed, removed from the store and
        logged as ``fdstore_dropped``. Metadata of enclaves not passed back
        is removed. Returns the number adopted.
        """
        adopted = set()
        dropped = set()
        for fd, name in passed:
            reason, detail = self._adopt_one(fd, name)
            if reason is None:
                adopted.add(name[len(NAME_PREFIX):])
                continue
            os.close(fd)
            log.warning("fdstore_dropped", reason=reason, name=name, detail=detail)
            dropped.add(name)
            if name:
                self._remove_name(name)
        # A name removed above also removed the copy adopted under it.
        for entry_id in adopted:
            if fd_name(entry_id) in dropped:
                self._store_again(entry_id)
        self._remove_stale_metadata(adopted)
        log.info("fdstore_adopted", count=len(adopted))
        return len(adopted)

    def _adopt_one(self, fd, name):
        """Adopt one fd; return (None, None), or why not as (reason, detail)."""
        entry_id = name[len(NAME_PREFIX):]
        if not name.startswith(NAME_PREFIX) or not is_id(entry_id):
            return "unknown_name", None
        try:
            with open(self._path(entry_id), encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            return "no_metadata", None
        except (OSError, ValueError) as e:
            return "bad_metadata", str(e)
        try:
            subtype, identity, layout, created, origin = _from_json(meta)
        except (KeyError, TypeError, ValueError) as e:
            return "bad_metadata", f"{type(e).__name__}: {e}"
        try:
            fdcheck.check_enclave_fd(fd, identity)
        except EpmError as e:
            return "bad_fd", str(e)
        try:
            self._pool.adopt(entry_id, subtype, identity, layout, fd, created,
                             origin)
        except EpmError as e:
            return "refused", str(e)
        return None, None

    def _observe(self, before, after):
        """The pool's observer: store what becomes available, remove what leaves.

        Called with the pool's lock held, so ``after.fd`` is open.
        """
        if after.state is State.AVAILABLE:
            if before is None:
                # Adopted: systemd holds it already, and its metadata is on disk.
                with self._cond:
                    self._stored.add(after.id)
                return
            self._queue_store(after)
        elif before is not None and before.state is State.AVAILABLE:
            self._remove(after.id)

    def _queue_store(self, entry):
        try:
            dup = os.dup(entry.fd)
        except OSError as e:
            log.warning("fdstore_store_failed", id=entry.id, reason=str(e))
            return
        with self._cond:
            old = self._pending.pop(entry.id, None)
            if old is not None:
                os.close(old[0])
            self._pending[entry.id] = (dup, entry)
            self._queue.append(entry.id)
            self._cond.notify()

    def _store_again(self, entry_id):
        try:
            entry = self._pool.get(entry_id)
        except EpmError:
            return
        if entry.state is State.AVAILABLE and self._active:
            with self._cond:
                self._stored.discard(entry_id)
            self._queue_store(entry)

    def _remove(self, entry_id):
        """Take ``entry_id`` out of the store, or cancel its queued store."""
        with self._cond:
            pending = self._pending.pop(entry_id, None)
            if pending is not None:
                os.close(pending[0])
                # The worker may have renamed the metadata in place already.
                _unlink(self._path(entry_id))
                return
            if entry_id not in self._stored:
                return
            self._stored.discard(entry_id)
            # Metadata first: without it a restarted daemon drops the fd
            # even if the message below never reaches systemd.
            _unlink(self._path(entry_id))
        self._remove_name(fd_name(entry_id))

    def _remove_name(self, name):
        try:
            systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}".encode(),
                           block=False)
        except OSError as e:
            log.warning("fdstore_remove_failed", name=name, reason=str(e))

    def _run(self):
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                entry_id = self._queue.popleft()
                item = self._pending.get(entry_id)
            if item is not None:
                self._store(entry_id, item)

    def _store(self, entry_id, item):
        """Write the metadata, then hand the fd to systemd, unless cancelled."""
        path = self._path(entry_id)
        temp = f"{path}.tmp"
        try:
            _write_synced(temp, _to_json(item[1]))
        except OSError as e:
            log.warning("fdstore_store_failed", id=entry_id, reason=str(e))
            self._cancel(entry_id, item, temp)
            return
        message = f"FDSTORE=1\nFDNAME={fd_name(entry_id)}".encode()
        for _ in range(_SEND_TRIES):
            with self._cond:
                if self._pending.get(entry_id) is not item:
                    _unlink(temp)
                    return  # left the pool meanwhile
                try:
                    if os.path.exists(temp):
                        os.replace(temp, path)
                    systemd.notify(message, fds=[item[0]], block=False)
                except BlockingIOError:
                    pass
                except OSError as e:
                    log.warning("fdstore_store_failed", id=entry_id, reason=str(e))
                    break
                else:
                    del self._pending[entry_id]
                    os.close(item[0])
                    self._stored.add(entry_id)
                    return
            time.sleep(_SEND_RETRY_S)
        else:
            log.warning("fdstore_store_failed", id=entry_id,
                        reason="the service manager's queue stayed full")
        self._cancel(entry_id, item, temp)

    def _cancel(self, entry_id, item, temp):
        with self._cond:
            if self._pending.get(entry_id) is item:
                del self._pending[entry_id]
                os.close(item[0])
                _unlink(self._path(entry_id))
            _unlink(temp)

    def _remove_stale_metadata(self, adopted):
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return
        kept = {f"{entry_id}.json" for entry_id in adopted}
        for name in names:
            if name not in kept:
                _unlink(os.path.join(self._dir, name))

    def _path(self, entry_id):
        return os.path.join(self._dir, f"{entry_id}.json")


def _to_json(entry):
    identity = entry.identity
    if identity is not None:
        identity = {"mrenclave": identity.mrenclave.hex(),
                    "mrsigner": identity.mrsigner.hex(),
                    "attributes": identity.attributes, "xfrm": identity.xfrm,
                    "size": identity.size, "backend": identity.backend}
    return json.dumps({
        "version": METADATA_VERSION, "subtype": entry.subtype,
        "identity": identity, "created": entry.created, "origin": entry.origin,
        "layout": [[e.addr, e.size, e.read, e.write, e.execute, e.share,
                    e.private] for e in entry.layout]}).encode()


def _from_json(meta):
    """(subtype, identity, layout, created, origin) from stored metadata.

    Raises KeyError, TypeError or ValueError naming what is wrong.
    """
    if meta["version"] != METADATA_VERSION:
        raise ValueError(f"version: expected {METADATA_VERSION}, "
                         f"got {meta['version']!r}")
    identity = meta["identity"]
    if identity is not None:
        identity = Identity(
            mrenclave=bytes.fromhex(identity["mrenclave"]),
            mrsigner=bytes.fromhex(identity["mrsigner"]),
            attributes=int(identity["attributes"]), xfrm=int(identity["xfrm"]),
            size=int(identity["size"]), backend=str(identity["backend"]))
    layout = tuple(LayoutEntry(int(addr), int(size), *map(bool, prot))
                   for addr, size, *prot in meta["layout"])
    if not layout:
        raise ValueError("layout: empty")
    return (str(meta["subtype"]), identity, layout, int(meta["created"]),
            str(meta["origin"]))


def _write_synced(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
