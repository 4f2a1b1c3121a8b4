"""The owner reaper: held enclaves of dead owners are discarded, others kept."""

import os
import subprocess
import time

import pytest

from epm_server.enclave import Identity, LayoutEntry
from epm_server.errors import NotFound
from epm_server.pool import Owner, Pool, State
from epm_server.reaper import OwnerReaper

IDENTITY = Identity(mrenclave=b"\1" * 32, mrsigner=b"\2" * 32, attributes=4,
                    xfrm=3, size=8192, backend="sim")
LAYOUT = (LayoutEntry(0x10000, 8192, True, True, False, True, False),)


@pytest.fixture
def pool():
    pool = Pool(64, 64)
    yield pool
    pool.close()


@pytest.fixture
def reaper(pool):
    reaper = OwnerReaper(pool)
    reaper.start()
    yield reaper
    reaper.stop()


@pytest.fixture
def owner():
    """A live process to hold entries; killed when the test asks or ends."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def hold(pool, reaper, pid):
    fd = os.memfd_create("enclave")
    entry_id = pool.check_in("skeleton", IDENTITY, LAYOUT, fd, Owner(pid, 0))
    reaper.watch(entry_id, pid)
    return entry_id


def wait_gone(pool, entry_id, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pool.get(entry_id)
        except NotFound:
            return True
        time.sleep(0.02)
    return False


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_entries_of_an_owner_that_dies_are_discarded(pool, reaper, owner):
    held = [hold(pool, reaper, owner.pid) for _ in range(3)]

    owner.kill()
    owner.wait()

    assert all(wait_gone(pool, entry_id) for entry_id in held)


def test_an_owner_that_is_already_gone_loses_its_entry_at_once(pool, reaper,
                                                               owner):
    owner.kill()
    owner.wait()

    entry_id = hold(pool, reaper, owner.pid)

    with pytest.raises(NotFound):
        pool.get(entry_id)


def test_one_owner_takes_one_descriptor_however_many_entries(pool, reaper,
                                                             owner):
    hold(pool, reaper, owner.pid)
    before = open_fds()

    for _ in range(20):
        hold(pool, reaper, owner.pid)

    assert open_fds() - before == 20  # the enclaves' memfds, no pidfd more


def test_an_entry_saved_final_survives_its_former_owner(pool, reaper, owner):
    entry_id = hold(pool, reaper, owner.pid)
    pool.save_final(entry_id)

    owner.kill()
    owner.wait()
    time.sleep(0.3)

    assert pool.get(entry_id).state is State.AVAILABLE


def test_a_former_holders_death_spares_the_next_holder(pool, reaper, owner):
    """Check-out with hold keeps the entry's ID from one holder to the next."""
    entry_id = hold(pool, reaper, owner.pid)
    pool.save_final(entry_id)
    pool.lease("skeleton", IDENTITY)
    pool.hold(entry_id, Owner(os.getpid(), 0))
    reaper.watch(entry_id, os.getpid())

    owner.kill()
    owner.wait()
    time.sleep(0.3)

    assert pool.get(entry_id).owner.pid == os.getpid()


def test_a_process_without_held_entries_keeps_no_descriptor(pool, reaper,
                                                            owner):
    before = open_fds()
    entry_id = hold(pool, reaper, owner.pid)
    pool.save_final(entry_id)

    deadline = time.monotonic() + 3
    while open_fds() > before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)

    assert open_fds() == before + 1  # the pooled memfd alone
