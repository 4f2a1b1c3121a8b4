"""The pool: transitions and their guard, matching, capacity, fd ownership."""

import os

import pytest

from epm_server.enclave import Identity, LayoutEntry
from epm_server.errors import (
    AlreadyExists, FailedPrecondition, NotFound, PermissionDenied,
    ResourceExhausted)
from epm_server.pool import ANY_IDENTITY, Owner, Pool, State

IDENTITY = Identity(mrenclave=b"\1" * 32, mrsigner=b"\2" * 32, attributes=4,
                    xfrm=3, size=8192, backend="sim")
OTHER = Identity(mrenclave=b"\3" * 32, mrsigner=b"\2" * 32, attributes=4,
                 xfrm=3, size=8192, backend="sim")
LAYOUT = (LayoutEntry(0x10000, 8192, True, True, False, True, False),)
OWNER = Owner(pid=1, uid=1000)


def fd_is_open(fd):
    # readlink, not listdir: listing opens a descriptor, which would take the
    # number just closed and make it look open.
    return os.path.lexists(f"/proc/self/fd/{fd}")


def new_fd():
    return os.memfd_create("test")


def check_in(pool, identity=IDENTITY, subtype="skeleton", fd=None):
    fd = new_fd() if fd is None else fd
    return pool.check_in(subtype, identity, LAYOUT, fd, OWNER), fd


def available(pool, **kwargs):
    entry_id, fd = check_in(pool, **kwargs)
    pool.save_final(entry_id)
    return entry_id, fd


def test_check_in_is_held_and_save_final_makes_available():
    pool = Pool(10, 10)
    entry_id, fd = check_in(pool)
    assert pool.get(entry_id).state is State.HELD
    pool.save_final(entry_id)
    assert pool.get(entry_id).state is State.AVAILABLE
    pool.close()


def test_guard_names_the_state():
    pool = Pool(10, 10)
    entry_id, _ = available(pool)
    with pytest.raises(FailedPrecondition, match="it is available"):
        pool.save_final(entry_id)
    pool.lease("skeleton", IDENTITY)
    with pytest.raises(FailedPrecondition, match="cannot delete .* it is leased"):
        pool.delete(entry_id)
    pool.close()


def test_unknown_id_is_not_found():
    pool = Pool(10, 10)
    with pytest.raises(NotFound):
        pool.save_final("nope")


def test_save_final_by_another_uid_is_refused():
    pool = Pool(10, 10)
    entry_id, _ = check_in(pool)
    with pytest.raises(PermissionDenied):
        pool.save_final(entry_id, uid=1001)
    pool.save_final(entry_id, uid=0)
    pool.close()


def test_lease_hand_out_closes_the_fd_and_drops_the_entry():
    pool = Pool(10, 10)
    entry_id, fd = available(pool)
    entry = pool.lease("skeleton", IDENTITY)
    assert entry.id == entry_id and entry.state is State.LEASED
    assert pool.lease("skeleton", IDENTITY) is None
    pool.hand_out(entry_id)
    assert not fd_is_open(fd)
    assert len(pool) == 0


def test_release_returns_a_leased_entry():
    pool = Pool(10, 10)
    entry_id, fd = available(pool)
    pool.lease("skeleton", IDENTITY)
    pool.release(entry_id)
    assert pool.get(entry_id).state is State.AVAILABLE
    assert fd_is_open(fd)
    pool.close()
    assert not fd_is_open(fd)


def test_oldest_available_first():
    pool = Pool(10, 10)
    first, _ = available(pool)
    available(pool)
    assert pool.lease("skeleton", IDENTITY).id == first
    pool.close()


def test_identity_and_subtype_must_match_exactly():
    pool = Pool(10, 10)
    available(pool)
    assert pool.lease("skeleton", OTHER) is None
    assert pool.lease("skeleton-1", IDENTITY) is None
    assert pool.lease("skeleton-1", ANY_IDENTITY) is None
    assert pool.lease("skeleton", ANY_IDENTITY) is not None
    pool.close()


def test_held_entries_are_never_leased():
    pool = Pool(10, 10)
    check_in(pool)
    assert pool.lease("skeleton", IDENTITY) is None
    pool.close()


def test_capacity_per_identity_and_total():
    pool = Pool(3, 2)
    check_in(pool)
    check_in(pool)
    fd = new_fd()
    with pytest.raises(ResourceExhausted, match="of this identity"):
        check_in(pool, fd=fd)
    check_in(pool, identity=OTHER, fd=fd)
    with pytest.raises(ResourceExhausted, match="in total"):
        check_in(pool, identity=OTHER)
    pool.close()


def test_enclaves_without_identity_count_by_subtype():
    """Published clients send no identity: one subtype's enclaves must not
    use up the room of another's."""
    pool = Pool(8, 2)
    for _ in range(2):
        check_in(pool, identity=None, subtype="a-1.0")
    fd = new_fd()
    with pytest.raises(ResourceExhausted, match="subtype 'a-1.0' without identity"):
        check_in(pool, identity=None, subtype="a-1.0", fd=fd)

    check_in(pool, identity=None, subtype="b-1.0", fd=fd)
    pool.close()


def test_a_pending_check_in_is_refused_when_the_pool_is_full_already():
    """SaveCache hears of a full pool, not only the fd that follows it."""
    pool = Pool(1, 1)
    available(pool)

    with pytest.raises(ResourceExhausted, match="in total"):
        pool.add_pending("legacy1", "skeleton", None, LAYOUT)
    assert [e.state for e in pool.entries()] == [State.AVAILABLE]
    pool.close()


def test_delete_closes_an_available_entry():
    pool = Pool(10, 10)
    entry_id, fd = available(pool)
    with pytest.raises(NotFound):
        pool.delete(entry_id, subtype="other")
    pool.delete(entry_id)
    assert not fd_is_open(fd)
    assert len(pool) == 0


def test_pending_entry_receives_its_fd():
    pool = Pool(10, 10)
    pool.add_pending("legacy-1", "skeleton", None, LAYOUT)
    with pytest.raises(AlreadyExists):
        pool.add_pending("legacy-1", "skeleton", None, LAYOUT)
    with pytest.raises(FailedPrecondition, match="it is pending"):
        pool.save_final("legacy-1")
    fd = new_fd()
    pool.receive_fd("legacy-1", fd, OWNER)
    assert pool.get("legacy-1").state is State.HELD
    pool.discard("legacy-1")
    assert not fd_is_open(fd)


def test_entries_in_id_order_after_cursor():
    pool = Pool(10, 10)
    for name in ("c", "a", "b"):
        pool.add_pending(name, "skeleton", None, LAYOUT)
    pool.add_pending("d", "other", None, LAYOUT)
    assert [e.id for e in pool.entries()] == ["a", "b", "c", "d"]
    assert [e.id for e in pool.entries(after="a", limit=1)] == ["b"]
    assert [e.id for e in pool.entries(subtype="other")] == ["d"]
    pool.close()


def test_close_closes_every_fd():
    pool = Pool(10, 10)
    _, held = check_in(pool)
    _, ready = available(pool)
    pool.close()
    assert not fd_is_open(held) and not fd_is_open(ready)


def test_hold_makes_a_leased_entry_held_by_its_new_owner():
    pool = Pool(10, 10)
    entry_id, fd = available(pool)
    pool.lease("skeleton", IDENTITY)
    holder = Owner(pid=2, uid=2000)

    pool.hold(entry_id, holder)

    entry = pool.get(entry_id)
    assert (entry.state, entry.owner, entry.fd) == (State.HELD, holder, fd)
    assert entry.origin == "handoff"
    assert fd_is_open(fd)
    pool.close()


def test_held_by_hold_only_its_owner_saves_it_final():
    pool = Pool(10, 10)
    entry_id, _ = available(pool)
    pool.lease("skeleton", IDENTITY)
    pool.hold(entry_id, Owner(pid=2, uid=2000))

    with pytest.raises(PermissionDenied, match="belongs to uid 2000, not 1000"):
        pool.save_final(entry_id, uid=1000)
    with pytest.raises(PermissionDenied):
        pool.save_final(entry_id, uid=1000, discard=True)
    with pytest.raises(FailedPrecondition, match="over the hand-off socket"):
        pool.save_final(entry_id, legacy=True)
    pool.save_final(entry_id, uid=2000)

    assert pool.get(entry_id).state is State.AVAILABLE
    pool.close()


def test_hold_needs_a_lease():
    pool = Pool(10, 10)
    entry_id, _ = available(pool)
    with pytest.raises(FailedPrecondition, match="cannot hold .* it is available"):
        pool.hold(entry_id, OWNER)
    pool.close()


def test_save_final_with_discard_closes_the_held_enclave():
    pool = Pool(10, 10)
    entry_id, fd = check_in(pool)

    pool.save_final(entry_id, uid=OWNER.uid, discard=True)

    assert not fd_is_open(fd)
    with pytest.raises(NotFound):
        pool.get(entry_id)
    pool.close()


def test_discard_for_an_owner_spares_a_later_holder():
    """An entry ID outlives its holder: a dead former holder's discard misses."""
    pool = Pool(10, 10)
    entry_id, _ = available(pool)
    pool.lease("skeleton", IDENTITY)
    pool.hold(entry_id, Owner(pid=2, uid=2000))

    with pytest.raises(FailedPrecondition, match="not held by pid 1"):
        pool.discard(entry_id, owner_pid=OWNER.pid)
    pool.discard(entry_id, owner_pid=2)

    with pytest.raises(NotFound):
        pool.get(entry_id)
    pool.close()


def test_check_in_available_is_saved_final_in_one_step():
    pool = Pool(10, 10)
    seen = []
    pool.on_transition(lambda before, after: seen.append(after.state))

    entry_id = pool.check_in("skeleton", IDENTITY, LAYOUT, new_fd(), OWNER,
                             available=True)

    assert pool.get(entry_id).state is State.AVAILABLE
    assert seen == [State.HELD, State.AVAILABLE]
    pool.close()


def test_check_in_available_of_a_subtype_not_recycled_is_closed():
    pool = Pool(10, 10, no_recycle=[("skeleton", IDENTITY)])
    fd = new_fd()

    entry_id = pool.check_in("skeleton", IDENTITY, LAYOUT, fd, OWNER,
                             available=True)

    assert not fd_is_open(fd)
    with pytest.raises(NotFound):
        pool.get(entry_id)
    pool.close()


def test_room_comes_back_as_enclaves_leave_the_pool():
    pool = Pool(3, 2)
    handed, _ = available(pool)
    pool.lease("skeleton", IDENTITY)
    pool.hand_out(handed)
    deleted, _ = available(pool)
    pool.delete(deleted)
    discarded, _ = check_in(pool)
    pool.discard(discarded)

    check_in(pool)
    check_in(pool)
    with pytest.raises(ResourceExhausted, match="of this identity"):
        check_in(pool)
    pool.close()


def test_a_pending_entry_takes_room_once_its_fd_comes():
    pool = Pool(2, 2)
    pool.add_pending("legacy-1", "skeleton", IDENTITY, LAYOUT)
    check_in(pool)
    pool.receive_fd("legacy-1", new_fd(), OWNER)

    with pytest.raises(ResourceExhausted, match="in total"):
        check_in(pool, identity=OTHER)
    pool.discard("legacy-1")
    check_in(pool, identity=OTHER)
    pool.close()


def test_an_unknown_id_is_quoted_in_the_error():
    pool = Pool(10, 10)
    with pytest.raises(NotFound) as raised:
        pool.save_final("\x1b[31m\n../x")
    assert str(raised.value) == "no enclave '\\x1b[31m\\n../x' in the pool"
    pool.close()


def test_a_released_enclave_is_still_the_oldest():
    pool = Pool(10, 10)
    first, _ = available(pool)
    available(pool)
    pool.release(pool.lease("skeleton", IDENTITY).id)
    assert pool.lease("skeleton", IDENTITY).id == first
    assert pool.lease("skeleton", ANY_IDENTITY).id != first
    pool.close()


def test_a_check_in_of_a_leased_fd_its_client_has_read_hands_the_lease_out():
    """A client checks its enclave back in, on another socket, before the
    sender has seen it read: the check-in settles the lease."""
    from epm_server.delivery import Delivery

    pool = Pool(1, 1)  # full: settling the lease must make the room
    handed_out = []
    pool.on_hand_out(lambda: handed_out.append(1))
    entry_id, _ = available(pool)
    leased = pool.lease("skeleton", IDENTITY)
    received = os.dup(leased.fd)  # the client's copy: the same open file
    delivery = [None]
    probe = lambda: delivery[0]  # noqa: E731
    pool.sent(leased.id, probe)

    with pytest.raises(AlreadyExists):  # still queued: the pool's own
        pool.check_in("skeleton", IDENTITY, LAYOUT, received, OWNER)
    delivery[0] = Delivery.READ
    new_id = pool.check_in("skeleton", IDENTITY, LAYOUT, received, OWNER)

    assert pool.get(new_id).state is State.HELD
    with pytest.raises(NotFound):
        pool.get(entry_id)
    assert not fd_is_open(leased.fd) and fd_is_open(received)
    assert handed_out == [1]
    # The sender settles later and learns that it was done.
    assert pool.hand_out(entry_id, probe) is False
    pool.close()


def test_a_pending_entry_receiving_a_read_leased_fd_settles_the_lease():
    from epm_server.delivery import Delivery

    pool = Pool(2, 2)
    available(pool)
    leased = pool.lease("skeleton", IDENTITY)
    pool.sent(leased.id, lambda: Delivery.READ)
    pool.add_pending("legacy1", "skeleton", None, LAYOUT)

    pool.receive_fd("legacy1", os.dup(leased.fd), OWNER)

    assert [e.id for e in pool.entries()] == ["legacy1"]
    pool.close()
