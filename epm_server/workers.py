"""Threads kept for reuse: each job starts at once, in a thread of its own.

The legacy hand-off gives every waiting check-in a thread, because each
blocks on its own listener with a deadline of its own. Starting a thread
costs about 90 us here (``Thread.start`` waits until the new thread runs),
and it happens inside the gRPC call that needs it; handing a job to a
parked thread costs a few microseconds. Unlike a ThreadPoolExecutor's, a
job never waits in a queue behind others that block: when no thread is
idle, a new one starts.
"""

import queue
import threading

import structlog

log = structlog.get_logger(__name__)


class Workers:
    """Runs jobs in threads named ``<name>-<n>``, keeping up to ``keep`` idle."""

    def __init__(self, name, keep=8):
        self._name = name
        self._keep = keep
        self._lock = threading.Lock()
        self._finished = threading.Condition(self._lock)
        self._idle = []  # the job queues of parked threads
        self._busy = 0
        self._started = 0

    def submit(self, fn, *args):
        """Run ``fn(*args)`` now in a parked or a new thread.

        Raises RuntimeError when no new thread can be started.
        """
        with self._lock:
            self._busy += 1
            if self._idle:
                self._idle.pop().put((fn, args))
                return
            self._started += 1
            name = f"{self._name}-{self._started}"
        # The job goes through the thread's queue, not its arguments, which
        # the thread would hold for as long as it lives.
        jobs = queue.SimpleQueue()
        jobs.put((fn, args))
        try:
            threading.Thread(target=self._run, args=(jobs,), name=name,
                             daemon=True).start()
        except BaseException:
            self._job_done()
            raise

    def wait_idle(self, timeout):
        """Wait up to ``timeout`` seconds for every job to end; True if they did."""
        with self._finished:
            return self._finished.wait_for(lambda: self._busy == 0, timeout)

    def _run(self, jobs):
        parked = True
        while parked:
            fn, args = jobs.get()
            finished = False
            try:
                try:
                    fn(*args)
                except Exception:
                    # A job handles its own errors; one that escapes is a bug,
                    # and it must not take the thread's later jobs with it.
                    log.exception("worker_job_failed",
                                  job=getattr(fn, "__name__", repr(fn)))
                finished = True
            finally:
                # Parked, the thread must not keep its last job's objects
                # alive; dying here, it still gives its count back.
                fn = args = None
                parked = self._job_done(jobs if finished else None)

    def _job_done(self, jobs=None):
        """Count a job as ended; park ``jobs`` if there is room. True if parked."""
        with self._lock:
            parked = jobs is not None and len(self._idle) < self._keep
            if parked:
                self._idle.append(jobs)
            self._busy -= 1
            if self._busy == 0:
                self._finished.notify_all()
        return parked
