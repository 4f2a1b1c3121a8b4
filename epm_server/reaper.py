"""Discard held enclaves whose owner died before saving them final.

DESIGN section 4: a held enclave's memory is whatever its dead owner left
mid-run, so it must never become available. The owner is watched through a
pidfd (pidfd_open(2)), which, unlike a pid, cannot be reused by another
process. Watches on entries that left the held state are dropped each tick.
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
        self._watches = {}  # pidfd -> entry ID
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
        """Discard ``entry_id`` if process ``pid`` ends while it is held."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._discard(entry_id, pid)
            return
        with self._lock:
            self._watches[pidfd] = entry_id

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
            for pidfd, entry_id in watches.items():
                if pidfd in dead:
                    self._discard(entry_id, None)
                elif self._is_held(entry_id):
                    continue
                with self._lock:
                    del self._watches[pidfd]
                os.close(pidfd)

    def _is_held(self, entry_id):
        try:
            return self._pool.get(entry_id).state is State.HELD
        except EpmError:
            return False

    def _discard(self, entry_id, pid):
        try:
            self._pool.discard(entry_id)
        except EpmError:
            return  # saved final or gone meanwhile: nothing to discard
        log.info("enclave_owner_died", id=entry_id, pid=pid)
