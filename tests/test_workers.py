"""Workers: every job starts at once, and idle threads are reused."""

import threading

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
    workers = Workers("test")
    seen = []
    for _ in range(3):
        run_and_wait(workers, lambda: seen.append(threading.get_ident()))

    assert len(set(seen)) == 1


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

    for thread in threads:
        thread.join(0.5)
    assert sum(thread.is_alive() for thread in threads) == 2


def test_wait_idle_is_false_while_a_job_runs():
    workers = Workers("test")
    release = threading.Event()
    workers.submit(release.wait, WAIT)

    assert workers.wait_idle(0.05) is False
    release.set()
    assert workers.wait_idle(WAIT) is True


def test_a_failing_job_is_logged_and_its_thread_goes_on(capsys):
    workers = Workers("test")
    seen = []

    def fails():
        seen.append(threading.get_ident())
        raise ValueError("boom")

    workers.submit(fails)
    assert workers.wait_idle(WAIT)
    run_and_wait(workers, lambda: seen.append(threading.get_ident()))

    assert len(seen) == 2 and seen[0] == seen[1]
    assert "worker_job_failed" in capsys.readouterr().out
