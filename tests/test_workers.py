"""Workers: every job starts at once, and idle threads are reused."""

import gc
import sys
import threading
import time
import weakref

import pytest
import structlog.testing

from epm_server.workers import Workers

WAIT = 10  # seconds; every wait below ends long before unless a test fails


def run_and_wait(workers, fn, *args):
    done = threading.Event()

    def job():
        try:
            fn(*args)
        finally:
            done.set()

    workers.submit(job)
    assert done.wait(WAIT)
    assert workers.wait_idle(WAIT)


def test_a_job_runs_in_a_named_thread_of_its_own():
    seen = []
    run_and_wait(Workers("test"), lambda: seen.append(threading.current_thread()))

    assert seen[0] is not threading.current_thread()
    assert seen[0].name == "test-1"


def test_a_thread_that_finished_its_job_takes_the_next():
    # Thread objects, not idents: a new thread may get an old one's ident.
    workers = Workers("test")
    seen = []
    for _ in range(3):
        run_and_wait(workers, lambda: seen.append(threading.current_thread()))

    assert seen[0] is seen[1] is seen[2]


def test_jobs_that_block_each_get_a_thread_instead_of_queueing():
    """Each job waits for all of them to be running: a queue would deadlock."""
    workers = Workers("test", keep=1)
    count = 5
    barrier = threading.Barrier(count, timeout=WAIT)
    passed = []
    for _ in range(count):
        workers.submit(lambda: passed.append(barrier.wait()))

    assert workers.wait_idle(WAIT)
    assert sorted(passed) == list(range(count))


def test_no_more_than_keep_threads_stay_parked():
    workers = Workers("test", keep=2)
    release = threading.Event()
    threads = []
    for _ in range(4):
        workers.submit(lambda: (threads.append(threading.current_thread()),
                                release.wait(WAIT)))
    release.set()
    assert workers.wait_idle(WAIT)

    deadline = time.monotonic() + WAIT
    while (sum(thread.is_alive() for thread in threads) > 2
           and time.monotonic() < deadline):
        time.sleep(0.01)
    assert sum(thread.is_alive() for thread in threads) == 2


def test_wait_idle_is_false_while_a_job_runs():
    workers = Workers("test")
    release = threading.Event()
    workers.submit(release.wait, WAIT)

    assert workers.wait_idle(0.05) is False
    release.set()
    assert workers.wait_idle(WAIT) is True


def test_a_failing_job_is_logged_and_its_thread_goes_on():
    workers = Workers("test")
    seen = []

    def fails():
        seen.append(threading.current_thread())
        raise ValueError("boom")

    with structlog.testing.capture_logs() as logs:
        workers.submit(fails)
        assert workers.wait_idle(WAIT)
    run_and_wait(workers, lambda: seen.append(threading.current_thread()))

    assert len(seen) == 2 and seen[0] is seen[1]
    assert [e["event"] for e in logs] == ["worker_job_failed"]
    assert logs[0]["job"] == "fails"


# pytest reports the thread's SystemExit, which threading itself ignores.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_thread_that_dies_in_a_job_still_ends_its_count():
    workers = Workers("test")
    dying = []

    def exits():
        dying.append(threading.current_thread())
        sys.exit(1)

    workers.submit(exits)

    assert workers.wait_idle(WAIT)
    dying[0].join(WAIT)
    assert not dying[0].is_alive()
    run_and_wait(workers, lambda: None)


def test_a_parked_thread_keeps_no_reference_to_its_last_job():
    class Payload:
        pass

    workers = Workers("test")
    payload = Payload()
    gone = weakref.ref(payload)
    run_and_wait(workers, lambda p: None, payload)
    del payload
    gc.collect()

    assert gone() is None
