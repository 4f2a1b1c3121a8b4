"""Discard held enclaves whose owner died before saving them final.

DESIGN section 4: a held enclave's memory is whatever its dead owner left
mid-run, so it must never become available. The owner is watched through a
pidfd (pidfd_open(2)), which, unlike a pid, cannot be reused by another
process.

One pidfd serves every entry a process holds: a warm client checks in again
and again, and a pidfd per check-in cost a system call on the hand-off path
and a pile of watches for this thread to sift at each tick. Which entries a
watch covers follows the pool (``Pool.on_transition``): an entry leaves its
watch as soon as it stops being held by that owner, so a former holder's
death never takes an entry that has since gone to another holder, even one
that got the same pid. (One window remains: an entry saved final by another
process of the owner's uid, and held again by a process with the dead
owner's pid, between the death and this thread's discard of it.)
"""

import os
import select
import threading

import structlog

from epm_server.errors import EpmError
from epm_server.pool import State

log = structlog.get_logger(__name__)

# Seconds between looks at the watch list: how long a new watch may wait to
# be polled, and how long stop() may wait.
_TICK = 0.5


class _Watch:
    """One owner process: its pidfd and the IDs of the entries it holds."""

    __slots__ = ("pid", "pidfd", "poller", "entries")

    def __init__(self, pid, pidfd):
        self.pid = pid
        self.pidfd = pidfd
        # A pidfd turns readable when its process has ended.
        self.poller = select.poll()
        self.poller.register(pidfd, select.POLLIN)
        self.entries = set()

    def ended(self):
        return bool(self.poller.poll(0))


class OwnerReaper:
    """Watches the owners of held entries on one background thread."""

    def __init__(self, pool):
        self._pool = pool
        # Taken inside the pool's lock (by the observer), never the reverse.
        self._lock = threading.Lock()
        self._watches = {}  # pidfd -> _Watch
        self._by_pid = {}  # pid -> the _Watch of the process that has it now
        self._by_entry = {}  # entry ID -> the _Watch that covers it
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="owner-reaper",
                                        daemon=True)
        pool.on_transition(self._observe)

    def start(self):
        """Start the watching thread."""
        self._thread.start()

    def stop(self):
        """Stop watching and close every pidfd."""
        self._stopping.set()
        self._thread.join()
        with self._lock:
            for pidfd in self._watches:
                os.close(pidfd)
            self._watches.clear()
            self._by_pid.clear()
            self._by_entry.clear()

    def watch(self, entry_id, pid):
        """Discard ``entry_id`` if process ``pid`` ends while it holds it.

        Call it right after the entry became held by ``pid``.
        """
        with self._lock:
            known = self._by_pid.get(pid)
            # A pidfd that has ended belongs to an earlier process with this
            # pid: this thread reaps its entries, the new one gets its own.
            if known is not None and not known.ended():
                self._cover(known, entry_id)
                return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._discard(entry_id, pid)
            return
        watch = _Watch(pid, pidfd)
        with self._lock:
            self._watches[pidfd] = watch
            self._by_pid[pid] = watch
            self._cover(watch, entry_id)

    def _cover(self, watch, entry_id):
        previous = self._by_entry.get(entry_id)
        if previous is not None:
            previous.entries.discard(entry_id)
        watch.entries.add(entry_id)
        self._by_entry[entry_id] = watch

    def _observe(self, before, after):
        """Pool observer: an entry no longer held by its owner leaves its watch."""
        if before is None or before.state is not State.HELD:
            return
        if after.state is State.HELD and after.owner == before.owner:
            return
        with self._lock:
            watch = self._by_entry.pop(before.id, None)
            if watch is not None:
                watch.entries.discard(before.id)

    def _run(self):
        while not self._stopping.is_set():
            with self._lock:
                pidfds = list(self._watches)
            if not pidfds:
                self._stopping.wait(_TICK)
                continue
            poller = select.poll()
            for pidfd in pidfds:
                poller.register(pidfd, select.POLLIN)
            ended = {fd for fd, _ in poller.poll(_TICK * 1000)}
            for pid, entry_ids in self._unwatch(pidfds, ended):
                for entry_id in entry_ids:
                    self._discard(entry_id, pid)

    def _unwatch(self, pidfds, ended):
        """Drop the watches of ended processes and of ones that hold nothing.

        Returns ``(pid, entry IDs)`` of the ended ones, to discard.
        """
        dead = []
        with self._lock:
            for pidfd in pidfds:
                watch = self._watches[pidfd]
                if pidfd not in ended and watch.entries:
                    continue
                del self._watches[pidfd]
                if self._by_pid.get(watch.pid) is watch:
                    del self._by_pid[watch.pid]
                for entry_id in watch.entries:
                    if self._by_entry.get(entry_id) is watch:
                        del self._by_entry[entry_id]
                os.close(pidfd)
                if pidfd in ended and watch.entries:
                    dead.append((watch.pid, list(watch.entries)))
        return dead

    def _discard(self, entry_id, pid):
        try:
            self._pool.discard(entry_id, owner_pid=pid)
        except EpmError:
            return  # saved final or gone meanwhile: nothing to discard
        log.info("enclave_owner_died", id=entry_id, pid=pid)
