"""The pool's derived state: the index of available entries and the counts
stay what a scan of the table would find, whatever the transitions."""

import collections
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epm_server.enclave import Identity, LayoutEntry
from epm_server.errors import EpmError
from epm_server.pool import ANY_IDENTITY, Owner, Pool, State

IDENTITIES = [Identity(mrenclave=bytes([i]) * 32, mrsigner=b"\2" * 32,
                       attributes=4, xfrm=3, size=8192, backend="sim")
              for i in (1, 2)] + [None]
SUBTYPES = ["skeleton", "other"]
LAYOUT = (LayoutEntry(0x10000, 8192, True, True, False, True, False),)
OWNER = Owner(pid=1, uid=1000)


def scanned(pool):
    """What the index and counts must be, found by scanning the table."""
    entries = list(pool._entries.values())
    available = collections.defaultdict(list)
    for entry in entries:
        if entry.state is State.AVAILABLE:
            available[(entry.subtype, entry.identity)].append(
                (pool._serial_of[entry.id], entry.id))
    with_fd = [e for e in entries if e.fd is not None]
    return {
        "available": {place: sorted(queue) for place, queue in available.items()},
        "pending": sum(1 for e in entries if e.state is State.PENDING),
        "enclaves": len(with_fd),
        # Enclaves without identity (published clients') count by subtype.
        "by_identity": dict(collections.Counter(
            e.identity if e.identity is not None else ("subtype", e.subtype)
            for e in with_fd)),
        "files": sum(len(ids) for ids in pool._files.values()),
        "serials": set(pool._serial_of) == set(pool._entries),
        "probes": all(pool._entries[i].state is State.LEASED
                      for i in pool._probes),
    }


def indexed(pool):
    return {"available": pool._available, "pending": pool._pending,
            "enclaves": pool._enclaves, "by_identity": pool._by_identity,
            "files": pool._enclaves, "serials": True, "probes": True}


def oldest(pool, subtype, identity):
    """The entry a lease must take: the first created that matches."""
    matches = [e for e in pool._entries.values()
               if e.state is State.AVAILABLE and e.subtype == subtype
               and (identity is ANY_IDENTITY or e.identity == identity)]
    return min(matches, key=lambda e: pool._serial_of[e.id], default=None)


OPERATIONS = st.lists(st.tuples(
    st.sampled_from(["check_in", "check_in_available", "add_pending",
                     "receive_fd", "save_final", "lease", "lease_any",
                     "hand_out", "release", "hold", "delete", "discard", "flush",
                     "sent"]),
    st.integers(0, 30), st.integers(0, 2), st.integers(0, 1)), max_size=60)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS)
def test_index_and_counts_match_the_table_after_any_transitions(operations):
    pool = Pool(8, 5, max_pending=3)
    ids = []
    try:
        for name, pick, which, kind in operations:
            identity, subtype = IDENTITIES[which], SUBTYPES[kind]
            target = ids[pick % len(ids)] if ids else "none"
            try:
                if name in ("check_in", "check_in_available"):
                    fd = os.memfd_create("test")
                    try:
                        ids.append(pool.check_in(
                            subtype, identity, LAYOUT, fd, OWNER,
                            available=name == "check_in_available"))
                    except EpmError:
                        os.close(fd)
                elif name == "add_pending":
                    entry_id = f"pending{len(ids)}"
                    pool.add_pending(entry_id, subtype, identity, LAYOUT)
                    ids.append(entry_id)
                elif name == "receive_fd":
                    fd = os.memfd_create("test")
                    try:
                        pool.receive_fd(target, fd, OWNER)
                    except EpmError:
                        os.close(fd)
                elif name.startswith("lease"):
                    wanted = ANY_IDENTITY if name == "lease_any" else identity
                    expected = oldest(pool, subtype, wanted)
                    got = pool.lease(subtype, wanted)
                    assert (got and got.id) == (expected and expected.id)
                elif name == "hold":
                    pool.hold(target, OWNER)
                elif name == "flush":
                    pool.flush(subtype)
                elif name == "sent":
                    pool.sent(target, lambda: None)
                else:
                    getattr(pool, name)(target)
            except EpmError:
                pass
            assert indexed(pool) == scanned(pool), name
    finally:
        pool.close()
    assert indexed(pool) == scanned(pool)
