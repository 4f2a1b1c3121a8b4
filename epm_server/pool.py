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
entry, send its fd without the lock, then hand it out or release it. A sender
that learns of the client's read only later registers a probe (``sent``), so
that the client checking the same enclave in again meanwhile settles the lease
instead of being refused. What is derived from the table (the index of
available entries, the counts, the files) changes in ``_transition`` only.
Observers (``on_transition``) see every change of state in order, under the
lock, so they must not block.
"""

import bisect
import dataclasses
import enum
import itertools
import os
import threading
import time
import uuid

import structlog

from epm_server import fdcheck, metrics
from epm_server.delivery import Delivery
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
# What a lease's probe may say that makes its enclave the client's: read, or
# closed unread (the fd may have been taken with MSG_PEEK; see delivery).
_SETTLED = frozenset({Delivery.READ, Delivery.DISCARDED})

# Operation -> (states it may start from, state it leads to); None is an
# entry not in the pool yet.
_OPERATIONS = {
    "check_in": ({None}, State.HELD),
    "add_pending": ({None}, State.PENDING),
    "adopt": ({None}, State.AVAILABLE),
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
        self._entries = {}
        # Entry ID -> its rank in creation order, from _serials.
        self._serial_of = {}
        self._serials = itertools.count()
        # (subtype, identity) -> [(serial, ID)] of its available entries,
        # oldest first: a lease takes the oldest without scanning the table.
        self._available = {}
        self._pending = 0
        # Leased entry ID -> the probe its sender registered (``sent``).
        self._probes = {}
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
        return self._add(entry_id, "check_in", subtype, identity, layout, fd,
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
        return self._add(entry_id, "adopt", subtype, identity, layout, fd, None,
                         origin, created=created)

    def add_pending(self, entry_id, subtype, identity, layout):
        """Add a pending entry whose fd comes later (legacy SaveCache).

        Raises AlreadyExists, ResourceExhausted, Unavailable.
        """
        self._add(entry_id, "add_pending", subtype, identity, layout, None, None,
                  "legacy")

    def receive_fd(self, entry_id, fd, owner):
        """Make a pending entry held with ``fd``, which the pool then owns.

        Raises NotFound, FailedPrecondition naming the entry's state,
        AlreadyExists (``fd``'s file is pooled already) or ResourceExhausted
        (no room for one more enclave); the caller still owns ``fd`` then.
        """
        settled = []
        try:
            with self._lock:
                entry = self._find(entry_id)
                # The file first: a lease it settles frees room.
                key = self._check_file(fd, settled)
                if entry.state is State.PENDING:
                    self._check_room(entry.identity, entry.subtype)
                self._transition(entry_id, "receive_fd", key=key, fd=fd,
                                 owner=owner)
        finally:
            self._handed_out(len(settled))

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

    def has_available(self, subtype):
        """True when an enclave of ``subtype`` (any identity) is available."""
        with self._lock:
            return any(kind == subtype for kind, _ in self._available)

    def lease(self, subtype, identity):
        """Lease the oldest available entry matching subtype and identity.

        ``identity`` ANY_IDENTITY matches on the subtype alone. Returns the
        leased snapshot, or None when nothing matches.
        """
        with self._lock:
            if identity is ANY_IDENTITY:
                queues = [queue for (kind, _), queue in self._available.items()
                          if kind == subtype]
            else:
                queue = self._available.get((subtype, identity))
                queues = [queue] if queue else []
            entry = None
            if queues:
                _, entry_id = min(queue[0] for queue in queues)
                entry = self._transition(entry_id, "lease")
        metrics.checkout(subtype, hit=entry is not None)
        return entry

    def sent(self, entry_id, probe):
        """The leased entry's fd is queued to its client; ``probe()`` tells,
        without blocking, whether the client has read it (a Delivery).

        The sender learns of the read only when it next looks, and the client
        may check the same enclave in again before then, on another socket:
        that check-in asks the probe, and hands the entry out at once when the
        fd was read (or the client closed with it unread). The sender then
        passes the same ``probe`` to ``hand_out``. Raises NotFound,
        FailedPrecondition.
        """
        with self._lock:
            entry = self._find(entry_id)
            if entry.state is not State.LEASED:
                raise FailedPrecondition(f"enclave {entry_id} is "
                                         f"{entry.state.value}, not leased")
            self._probes[entry_id] = probe

    def hand_out(self, entry_id, probe=None):
        """The leased fd left with its reply: close the daemon's copy, drop it.

        With the ``probe`` given to ``sent``, returns False and does nothing
        when a check-in of the same enclave handed it out already; else
        returns True. Raises NotFound, FailedPrecondition.
        """
        with self._lock:
            if probe is not None and self._probes.get(entry_id) is not probe:
                return False
            self._transition(entry_id, "hand_out")
        self._handed_out(1)
        return True

    def _handed_out(self, count):
        """Run the hand-out callbacks, without the lock, once per hand-out."""
        for _ in range(count):
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
        self._handed_out(1)

    def release(self, entry_id):
        """The leased fd never left (its reply was not sent): make the entry
        available again. Raises NotFound, FailedPrecondition.
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
            self._serial_of.clear()
            self._available.clear()
            self._pending = 0
            self._probes.clear()
            for entry in entries:
                if entry.fd is not None:
                    os.close(entry.fd)
        log.debug("pool_closed", closed=len(entries))

    def _add(self, entry_id, operation, subtype, identity, layout, fd, owner,
             origin, created=None, save_final=False):
        settled = []
        try:
            with self._lock:
                if self._closed:
                    raise Unavailable("the daemon is shutting down")
                entry_id = entry_id or uuid.uuid4().hex
                if entry_id in self._entries:
                    raise AlreadyExists(f"enclave {entry_id} is already in the pool")
                # The file first: a lease it settles frees room.
                key = self._check_file(fd, settled) if fd is not None else None
                if fd is None:
                    if self._pending >= self._max_pending:
                        raise ResourceExhausted(
                            f"{self._max_pending} legacy check-ins are waiting "
                            "for their fd already")
                # A pending entry is checked now too, so that a published
                # client hears of a full pool from SaveCache; the fd is
                # checked again when it comes.
                self._check_room(identity, subtype)
                entry = self._transition(
                    entry_id, operation, key=key, subtype=subtype,
                    identity=identity, layout=tuple(layout), fd=fd, owner=owner,
                    created=int(time.time()) if created is None else created,
                    origin=origin)
                if save_final:
                    self._save_final(entry)
        finally:
            self._handed_out(len(settled))
        return entry_id

    def _check_room(self, identity, subtype):
        """Refuse one more enclave (an entry with an fd) past either limit."""
        if self._enclaves >= self._max_total:
            raise ResourceExhausted(
                f"pool is full: {self._max_total} enclaves in total")
        key = _capacity_key(identity, subtype)
        if self._by_identity.get(key, 0) >= self._max_per_identity:
            what = ("of this identity" if identity is not None else
                    f"of subtype {shown(subtype, quoted=True)} without identity")
            raise ResourceExhausted(f"pool is full: {self._max_per_identity} "
                                    f"enclaves {what}")

    def _count(self, entry, change):
        """Count one enclave more (``change`` 1) or less (-1) like ``entry``."""
        self._enclaves += change
        key = _capacity_key(entry.identity, entry.subtype)
        same = self._by_identity.get(key, 0) + change
        if same:
            self._by_identity[key] = same
        else:
            del self._by_identity[key]

    def _check_file(self, fd, settled):
        """Return ``fd``'s index key; refuse a file that is pooled already.

        A leased entry of that file whose client has read the fd, or closed
        with it unread (its probe says so), may be the client's already, and
        the client checks it in again before its sender noticed: it is
        handed out here, and its ID appended to ``settled``.
        """
        key = fdcheck.file_key(fd)
        for other in list(self._files.get(key[:2], ())):
            entry = self._entries[other]
            if key[2] and not fdcheck.same_open_file(fd, entry.fd):
                continue
            probe = self._probes.get(other)
            if probe is not None and probe() in _SETTLED:
                self._transition(other, "hand_out")
                log.debug("enclave_handed_out_at_check_in", id=other)
                settled.append(other)
                continue
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

    def _transition(self, entry_id, operation, key=None, **changes):
        """The guard: apply ``operation`` or refuse it naming the state.

        ``changes`` are other fields of the entry that change with its state
        (all of them for an entry added); ``key`` is the file key of an fd
        the entry gets, when the caller has it. Called with the lock held;
        returns the new snapshot.
        """
        sources, target = _OPERATIONS[operation]
        if None in sources:
            before = None
            entry = Entry(id=entry_id, state=target, **changes)
        else:
            before = self._find(entry_id)
            if before.state not in sources:
                raise FailedPrecondition(
                    f"cannot {operation.replace('_', ' ')} enclave {entry_id}: "
                    f"it is {before.state.value}")
            entry = dataclasses.replace(before, state=target, **changes)
        for callback in self._observers:
            callback(before, entry)
        if before is not None:
            self._leave(before)
        self._enter(entry, key)
        log.debug("enclave_state", state=target.value, id=entry_id,
                  subtype=entry.subtype)
        return entry

    def _leave(self, entry):
        """Drop what the table derives from ``entry`` in its old state."""
        if entry.state is State.PENDING:
            self._pending -= 1
        elif entry.state is State.AVAILABLE:
            place = (entry.subtype, entry.identity)
            queue = self._available[place]
            del queue[bisect.bisect_left(queue, (self._serial_of[entry.id],
                                                 entry.id))]
            if not queue:
                del self._available[place]
        elif entry.state is State.LEASED:
            self._probes.pop(entry.id, None)

    def _enter(self, entry, key):
        """Record ``entry`` in its new state, or close it if it left the pool."""
        if entry.state in _GONE:
            del self._entries[entry.id]
            del self._serial_of[entry.id]
            if entry.fd is not None:
                self._forget_file(entry)
                self._count(entry, -1)
                os.close(entry.fd)
            return
        if entry.id not in self._entries:
            self._serial_of[entry.id] = next(self._serials)
        gets_fd = entry.fd is not None and (
            entry.id not in self._entries or self._entries[entry.id].fd is None)
        self._entries[entry.id] = entry
        if gets_fd:
            key = key or fdcheck.file_key(entry.fd)
            self._files.setdefault(key[:2], set()).add(entry.id)
            self._count(entry, 1)
        if entry.state is State.PENDING:
            self._pending += 1
        elif entry.state is State.AVAILABLE:
            bisect.insort(self._available.setdefault(
                (entry.subtype, entry.identity), []),
                (self._serial_of[entry.id], entry.id))


def _capacity_key(identity, subtype):
    """What ``[pool] max_per_identity`` counts by: the identity, or for
    published clients' enclaves, which carry none, the subtype."""
    return identity if identity is not None else ("subtype", subtype)
