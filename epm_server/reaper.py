"""Discard held enclaves whose owner died before saving them final.

DESIGN section 4: a held enclave's memory is whatever its dead owner left
mid-run, so it must never become available. The owner is watched through a
pidfd (pidfd_open(2)), which, unlike a pid, cannot be reused by another
process. Watches on entries that left the held state are dropped each tick.

An entry checked out with hold keeps its ID from one holder to the next, so
a watch names the pid it was made for, and discards the entry only while
that pid holds it: a former holder's death never takes a later holder's
enclave. (A pid reused within one tick by the entry's next holder would
still be mistaken for the old one; pids cycle through 4 million numbers.)
"""

import os
import select
import threading

import structlog

from epm_server.errors import EpmError
from epm_server.pool import State

log = structlog.get_logger(__name__)

# Seconds between looks at the watch list; bounds how long stop() waits and
# how long a pidfd outlives its entry's save final.
_TICK = 0.5


class OwnerReaper:
    """Watches the owners of held entries on one background thread."""

    def __init__(self, pool):
        self._pool = pool
        self._lock = threading.Lock()
        self._watches = {}  # pidfd -> (entry ID, owner pid)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="owner-reaper",
                                        daemon=True)

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

    def watch(self, entry_id, pid):
        """Discard ``entry_id`` if process ``pid`` ends while it holds it."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._discard(entry_id, pid)
            return
        with self._lock:
            self._watches[pidfd] = (entry_id, pid)

    def _run(self):
        while not self._stopping.is_set():
            with self._lock:
                watches = dict(self._watches)
            poller = select.poll()
            for pidfd in watches:
                poller.register(pidfd, select.POLLIN)
            dead = {fd for fd, _ in poller.poll(_TICK * 1000)} if watches else set()
            if not watches:
                self._stopping.wait(_TICK)
            for pidfd, (entry_id, pid) in watches.items():
                if pidfd in dead:
                    self._discard(entry_id, pid)
                elif self._is_held(entry_id, pid):
                    continue
                with self._lock:
                    del self._watches[pidfd]
                os.close(pidfd)

    def _is_held(self, entry_id, pid):
        try:
            entry = self._pool.get(entry_id)
        except EpmError:
            return False
        return (entry.state is State.HELD and entry.owner is not None
                and entry.owner.pid == pid)

    def _discard(self, entry_id, pid):
        try:
            self._pool.discard(entry_id, owner_pid=pid)
        except EpmError:
            return  # saved final or gone meanwhile: nothing to discard
        log.info("enclave_owner_died", id=entry_id, pid=pid)
