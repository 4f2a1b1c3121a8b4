"""The enclave pool: entries, their states, and the one guard on transitions.

An entry's life (DESIGN section 4)::

    pending --receive_fd--> held --save_final--> available --lease--> leased
    (none) --check_in--> held            (with available, save_final follows
                                          under the same lock)
    leased --hand_out--> handed out      (the daemon closed its copy)
    leased --release--> available        (the hand-off failed)
    leased --hold--> held                (check-out with hold: the client
                                          owns it now, the daemon keeps a copy)
    available --delete--> deleted        (DeleteCache, flush)
    held --retire--> deleted             (save-final where recycling is off)
    pending|held --discard--> discarded  (fd never came, owner gone)
    (none) --adopt--> available          (passed back after a restart)

Entries in the last three states have left the pool and their fd is closed.
One lock guards the table; nothing here does socket I/O, so callers lease an
entry, send its fd without the lock, then hand it out or release it.
Observers (``on_transition``) see every change of state in order, under the
lock, so they must not block.
"""

import dataclasses
import enum
import os
import threading
import time
import uuid

import structlog

from epm_server import fdcheck, metrics
from epm_server.errors import (
    AlreadyExists, FailedPrecondition, NotFound, PermissionDenied,
    ResourceExhausted, Unavailable, shown)

log = structlog.get_logger(__name__)

# Legacy check-outs name a subtype only (published clients know no identity).
ANY_IDENTITY = object()


class State(enum.Enum):
    """Where an entry is in its life; the value is what logs and ListCache show."""

    PENDING = "pending"
    HELD = "held"
    AVAILABLE = "available"
    LEASED = "leased"
    HANDED_OUT = "handed_out"
    DELETED = "deleted"
    DISCARDED = "discarded"


_GONE = frozenset({State.HANDED_OUT, State.DELETED, State.DISCARDED})

# Operation -> (states it may start from, state it leads to).
_OPERATIONS = {
    "receive_fd": ({State.PENDING}, State.HELD),
    "save_final": ({State.HELD}, State.AVAILABLE),
    "lease": ({State.AVAILABLE}, State.LEASED),
    "hand_out": ({State.LEASED}, State.HANDED_OUT),
    "release": ({State.LEASED}, State.AVAILABLE),
    "hold": ({State.LEASED}, State.HELD),
    "delete": ({State.AVAILABLE}, State.DELETED),
    "retire": ({State.HELD}, State.DELETED),
    "discard": ({State.PENDING, State.HELD}, State.DISCARDED),
}


@dataclasses.dataclass(frozen=True)
class Owner:
    """The process that holds an enclave (from SO_PEERCRED): the one that
    checked it in, or checked it out with hold."""

    pid: int
    uid: int


@dataclasses.dataclass(frozen=True)
class Entry:
    """A snapshot of one pool entry; the pool replaces it on each transition.

    ``fd`` is the daemon's descriptor (None while pending); it stays owned by
    the pool, and a holder of a leased snapshot may only send it.
    """

    id: str
    subtype: str
    identity: object
    layout: tuple
    fd: int | None
    state: State
    owner: Owner | None
    created: int
    # "handoff" (our socket, owner watched), "legacy" (published clients) or
    # "prewarm" (built by the daemon, never used by a container).
    origin: str = "legacy"


class Pool:
    """The enclave-cache-pool: thread-safe, bounded in total and per identity.

    Pending entries (no fd yet) count against ``max_pending`` only, so that
    check-ins that never come cannot fill the room of real enclaves.
    """

    def __init__(self, max_total, max_per_identity, max_pending=16,
                 no_recycle=()):
        self._max_total = max_total
        # (subtype, identity) pairs whose returned enclaves are closed at
        # save-final: a recycled enclave carries its previous tenant's memory.
        self._no_recycle = frozenset(no_recycle)
        self._on_hand_out = []
        self._observers = []
        self._max_per_identity = max_per_identity
        self._max_pending = max_pending
        self._lock = threading.Lock()
        # Insertion order is creation order: the first match is the oldest.
        self._entries = {}
        # (st_dev, st_ino) -> IDs of the entries whose fd is that file: one
        # enclave checked in twice would go to two clients.
        self._files = {}
        # Entries with an fd (every state but pending), in all and by
        # identity: the limits are checked at each check-in, and counting
        # the table then cost time in proportion to its size.
        self._enclaves = 0
        self._by_identity = {}
        self._closed = False

    def on_hand_out(self, callback):
        """Call ``callback()`` (without the lock) after each hand-out."""
        self._on_hand_out.append(callback)

    def on_transition(self, callback):
        """Call ``callback(before, after)`` on every change of an entry's state.

        ``before`` is None for an entry just added; ``after`` is in a state
        that has left the pool when it did, and its fd is still open during
        the call. The call is made with the pool's lock held, so observers
        see changes in the order they happened; a callback must return
        quickly, must not raise and must not call the pool.
        """
        self._observers.append(callback)

    @property
    def capacity(self):
        """The most enclaves (entries with an fd) the pool holds at once."""
        return self._max_total

    def __len__(self):
        with self._lock:
            return len(self._entries)

    def get(self, entry_id):
        """Return the entry's snapshot. Raises NotFound."""
        with self._lock:
            return self._find(entry_id)

    def check_in(self, subtype, identity, layout, fd, owner, entry_id=None,
                 origin="handoff", available=False):
        """Add a held entry that owns ``fd``; return its ID.

        With ``available`` the entry is saved final in the same step, as
        ``save_final`` would (made available, or closed where its subtype and
        identity are not recycled): its owner is done with it. The pool owns
        ``fd`` only when this returns; on an error the caller still does.
        Raises AlreadyExists (the ID, or ``fd``'s file, is in the pool
        already), ResourceExhausted, Unavailable.
        """
        return self._add(entry_id, subtype, identity, layout, fd, State.HELD,
                         owner, origin, save_final=available)

    def adopt(self, entry_id, subtype, identity, layout, fd, created, origin):
        """Add an available entry that an earlier daemon pooled; return its ID.

        Its fd came back from the service manager after a restart; the
        caller has checked it like a check-in's. The pool owns ``fd`` only
        when this returns. Raises AlreadyExists, ResourceExhausted,
        Unavailable, FailedPrecondition (its subtype is not recycled now and
        a container returned it).
        """
        if (subtype, identity) in self._no_recycle and origin != "prewarm":
            raise FailedPrecondition(f"enclave {entry_id}: subtype "
                                     f"{shown(subtype, quoted=True)} is not recycled")
        return self._add(entry_id, subtype, identity, layout, fd, State.AVAILABLE,
                         None, origin, created=created)

    def add_pending(self, entry_id, subtype, identity, layout):
        """Add a pending entry whose fd comes later (legacy SaveCache).

        Raises AlreadyExists, ResourceExhausted, Unavailable.
        """
        self._add(entry_id, subtype, identity, layout, None, State.PENDING, None,
                  "legacy")

    def receive_fd(self, entry_id, fd, owner):
        """Make a pending entry held with ``fd``, which the pool then owns.

        Raises NotFound, FailedPrecondition naming the entry's state,
        AlreadyExists (``fd``'s file is pooled already) or ResourceExhausted
        (no room for one more enclave); the caller still owns ``fd`` then.
        """
        with self._lock:
            entry = self._find(entry_id)
            if entry.state is State.PENDING:
                self._check_room(entry.identity)
            key = self._check_file(fd)
            self._transition(entry_id, "receive_fd", fd=fd, owner=owner)
            self._files.setdefault(key[:2], set()).add(entry_id)
            self._count(entry.identity, 1)

    def save_final(self, entry_id, uid=None, legacy=False, discard=False):
        """Make a held entry available; ``uid`` (when known) must own it or be 0.

        ``legacy`` says the call came over gRPC, which knows no caller: an
        entry checked in over our hand-off socket has an owner, and only the
        hand-off socket can tell that the owner asks. ``discard`` closes the
        entry instead (its owner found it unusable). Raises NotFound,
        PermissionDenied, FailedPrecondition naming the state or the socket.
        """
        with self._lock:
            entry = self._find(entry_id)
            if legacy and entry.origin == "handoff":
                raise FailedPrecondition(
                    f"enclave {entry_id} was checked in over the hand-off socket: "
                    "save-final for it goes over the hand-off socket")
            if (uid is not None and uid != 0 and entry.owner is not None
                    and uid != entry.owner.uid):
                raise PermissionDenied(f"enclave {entry_id} belongs to uid "
                                       f"{entry.owner.uid}, not {uid}")
            if discard:
                self._transition(entry_id, "discard")
                log.info("enclave_discarded_by_owner", id=entry_id,
                         subtype=entry.subtype)
                return
            self._save_final(entry)

    def _save_final(self, entry):
        """Make a held entry available, or retire it if it is not recycled."""
        if ((entry.subtype, entry.identity) in self._no_recycle
                and entry.origin != "prewarm"):
            self._transition(entry.id, "retire")
            log.info("enclave_not_recycled", id=entry.id, subtype=entry.subtype)
            return
        self._transition(entry.id, "save_final")

    def lease(self, subtype, identity):
        """Lease the oldest available entry matching subtype and identity.

        ``identity`` ANY_IDENTITY matches on the subtype alone. Returns the
        leased snapshot, or None when nothing matches.
        """
        with self._lock:
            for entry in self._entries.values():
                if (entry.state is State.AVAILABLE and entry.subtype == subtype
                        and (identity is ANY_IDENTITY or entry.identity == identity)):
                    entry = self._transition(entry.id, "lease")
                    break
            else:
                entry = None
        metrics.checkout(subtype, hit=entry is not None)
        return entry

    def hand_out(self, entry_id):
        """The leased fd reached its client: close the daemon's copy, drop it.

        Raises NotFound, FailedPrecondition.
        """
        with self._lock:
            self._transition(entry_id, "hand_out")
        for callback in self._on_hand_out:
            callback()

    def hold(self, entry_id, owner):
        """The leased fd reached ``owner``, who asked to hold it: the entry
        stays in the pool, held by ``owner``, and the daemon keeps its fd.

        The entry's origin becomes "handoff": it now carries its holder's
        memory, and only the hand-off socket knows who may save it final.
        Raises NotFound, FailedPrecondition.
        """
        with self._lock:
            self._transition(entry_id, "hold", owner=owner, origin="handoff")
        for callback in self._on_hand_out:
            callback()

    def release(self, entry_id):
        """The hand-off failed: make the leased entry available again.

        Raises NotFound, FailedPrecondition.
        """
        with self._lock:
            entry = self._transition(entry_id, "release")
        metrics.failed_handoff(entry.subtype)

    def delete(self, entry_id, subtype=""):
        """Close and drop an available entry (of ``subtype`` when given).

        Raises NotFound, FailedPrecondition naming the state.
        """
        with self._lock:
            entry = self._find(entry_id)
            if subtype and entry.subtype != subtype:
                raise NotFound(f"no enclave {shown(entry_id, quoted=True)} of subtype "
                               f"{shown(subtype, quoted=True)}")
            self._transition(entry_id, "delete")

    def flush(self, subtype=""):
        """Close every available entry (of ``subtype`` when given).

        Returns ``(deleted, kept)``, kept counting the entries still in use.
        """
        deleted = kept = 0
        with self._lock:
            for entry in list(self._entries.values()):
                if subtype and entry.subtype != subtype:
                    continue
                if entry.state is State.AVAILABLE:
                    self._transition(entry.id, "delete")
                    deleted += 1
                else:
                    kept += 1
        return deleted, kept

    def discard(self, entry_id, owner_pid=None):
        """Drop a pending or held entry whose state is unknown.

        With ``owner_pid``, only while that process holds it: an entry ID
        outlives one holder when it is checked out with hold again.
        Raises NotFound, FailedPrecondition.
        """
        with self._lock:
            entry = self._find(entry_id)
            if owner_pid is not None and (entry.owner is None
                                          or entry.owner.pid != owner_pid):
                raise FailedPrecondition(f"enclave {entry_id} is not held by "
                                         f"pid {owner_pid}")
            self._transition(entry_id, "discard")

    def entries(self, subtype="", after="", limit=0, states=None):
        """Snapshots in ID order, with ID > ``after``, at most ``limit`` (0: all).

        ``subtype`` and ``states`` filter when given.
        """
        with self._lock:
            found = sorted((e for e in self._entries.values()
                            if (not subtype or e.subtype == subtype)
                            and (states is None or e.state in states)
                            and e.id > after), key=lambda e: e.id)
        return found[:limit] if limit > 0 else found

    def close(self):
        """Close every fd the pool owns and refuse further check-ins.

        Callers stop their hand-offs first: a leased fd is closed too.
        """
        with self._lock:
            self._closed = True
            entries, self._entries = list(self._entries.values()), {}
            self._files.clear()
            self._enclaves = 0
            self._by_identity.clear()
            for entry in entries:
                if entry.fd is not None:
                    os.close(entry.fd)
        log.debug("pool_closed", closed=len(entries))

    def _add(self, entry_id, subtype, identity, layout, fd, state, owner, origin,
             created=None, save_final=False):
        with self._lock:
            if self._closed:
                raise Unavailable("the daemon is shutting down")
            entry_id = entry_id or uuid.uuid4().hex
            if entry_id in self._entries:
                raise AlreadyExists(f"enclave {entry_id} is already in the pool")
            if state is State.PENDING:
                pending = sum(1 for e in self._entries.values()
                              if e.state is State.PENDING)
                if pending >= self._max_pending:
                    raise ResourceExhausted(f"{self._max_pending} legacy check-ins "
                                            "are waiting for their fd already")
            else:
                self._check_room(identity)
            key = self._check_file(fd) if fd is not None else None
            entry = Entry(id=entry_id, subtype=subtype, identity=identity,
                          layout=tuple(layout), fd=fd, state=state, owner=owner,
                          created=int(time.time()) if created is None else created,
                          origin=origin)
            self._entries[entry_id] = entry
            if key is not None:
                self._files.setdefault(key[:2], set()).add(entry_id)
                self._count(identity, 1)
            for callback in self._observers:
                callback(None, entry)
            if save_final:
                self._save_final(entry)
        log.debug("enclave_state", state=state.value, id=entry_id, subtype=subtype)
        return entry_id

    def _check_room(self, identity):
        """Refuse one more enclave (an entry with an fd) past either limit."""
        if self._enclaves >= self._max_total:
            raise ResourceExhausted(
                f"pool is full: {self._max_total} enclaves in total")
        if self._by_identity.get(identity, 0) >= self._max_per_identity:
            raise ResourceExhausted(f"pool is full: {self._max_per_identity} "
                                    "enclaves of this identity")

    def _count(self, identity, change):
        """Count one enclave more (``change`` 1) or less (-1) of ``identity``."""
        self._enclaves += change
        same = self._by_identity.get(identity, 0) + change
        if same:
            self._by_identity[identity] = same
        else:
            del self._by_identity[identity]

    def _check_file(self, fd):
        """Return ``fd``'s index key; refuse a file that is pooled already."""
        key = fdcheck.file_key(fd)
        for other in self._files.get(key[:2], ()):
            other_fd = self._entries[other].fd
            if not key[2] or fdcheck.same_open_file(fd, other_fd):
                raise AlreadyExists(f"enclave fd: the same open file as enclave "
                                    f"{other}, which is in the pool already")
        return key

    def _find(self, entry_id):
        try:
            return self._entries[entry_id]
        except KeyError:
            raise NotFound(f"no enclave {shown(entry_id, quoted=True)} in the pool") \
                from None

    def _forget_file(self, entry):
        key = fdcheck.file_key(entry.fd)[:2]
        ids = self._files.get(key, set())
        ids.discard(entry.id)
        if not ids:
            self._files.pop(key, None)

    def _transition(self, entry_id, operation, **changes):
        """The guard: apply ``operation`` or refuse it naming the state.

        ``changes`` are other fields of the entry that change with its state.
        Called with the lock held; returns the new snapshot.
        """
        before = self._find(entry_id)
        sources, target = _OPERATIONS[operation]
        if before.state not in sources:
            raise FailedPrecondition(f"cannot {operation.replace('_', ' ')} "
                                     f"enclave {entry_id}: it is {before.state.value}")
        entry = dataclasses.replace(before, state=target, **changes)
        for callback in self._observers:
            callback(before, entry)
        if target in _GONE:
            del self._entries[entry_id]
            if entry.fd is not None:
                self._forget_file(entry)
                self._count(entry.identity, -1)
                os.close(entry.fd)
        else:
            self._entries[entry_id] = entry
        log.debug("enclave_state", state=target.value, id=entry_id,
                  subtype=entry.subtype)
        return entry
