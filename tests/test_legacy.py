"""Published clients against our daemon, and what crashes the published daemon.

``legacy_client.py`` behaves as the published Go client (Healthz first, a
new connection per call, 1 s deadlines) and runs in its own processes.
"""

import concurrent.futures
import os
import pathlib
import subprocess
import sys
import threading
import time

import grpc
import pytest

from conftest import REPO
from epm_api import handoff_pb2 as hpb
from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc
from epm_server.errors import NotFound, Unavailable
from epm_server.legacy import LegacyHandoff
from epm_server.peers import PeerPolicy
from epm_server.pool import Owner, Pool, State
from test_pool import LAYOUT
from test_service import code_of, legacy_save_request, listed, wait_for_state

CLIENT = pathlib.Path(__file__).with_name("legacy_client.py")
POOL = "enclave-cache-pool"
SUBTYPE = "skeleton-0.0.0"


def run_client(daemon, *args):
    return subprocess.run(
        [sys.executable, str(CLIENT), args[0], str(daemon.grpc_socket), *args[1:]],
        capture_output=True, text=True, timeout=30, cwd=REPO)


def published_check_in(daemon, stub, cache_id, content, subtype=SUBTYPE):
    result = run_client(daemon, "check-in", cache_id, subtype, content.hex())
    assert result.returncode == 0, result.stderr
    assert wait_for_state(stub, cache_id, "held")
    result = run_client(daemon, "save-final", cache_id, subtype)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def stub(daemon):
    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}") as channel:
        yield pb_grpc.EnclavePoolManagerStub(channel)


@pytest.fixture
def quick_daemon(make_daemon):
    """A daemon that gives up on a missing legacy check-in after 1 s."""
    return make_daemon("[legacy]\naccept_timeout = 1\n")


@pytest.mark.parametrize("late", [0, 0.3])
def test_published_client_checks_in_and_out_across_processes(daemon, stub, late):
    published_check_in(daemon, stub, "in-1", b"tenant one")

    result = run_client(daemon, "check-out", "out-1", SUBTYPE, str(late))

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["in-1", b"tenant one".hex()]
    assert listed(stub) == []
    assert sorted(p.name for p in daemon.run_dir.iterdir()) == [
        "epm-handoff.sock", "epm.sock"]


def test_published_check_out_of_an_empty_pool_gets_nothing(daemon):
    result = run_client(daemon, "check-out", "out-2", SUBTYPE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_check_outs_never_cross_subtypes(daemon, stub):
    published_check_in(daemon, stub, "a-1", b"subtype a", subtype="rt-a")
    published_check_in(daemon, stub, "b-1", b"subtype b", subtype="rt-b")

    got_b = run_client(daemon, "check-out", "o-b", "rt-b")
    got_c = run_client(daemon, "check-out", "o-c", "rt-c")
    got_a = run_client(daemon, "check-out", "o-a", "rt-a")

    assert got_b.stdout.split() == ["b-1", b"subtype b".hex()]
    assert got_c.stdout.strip() == "none"
    assert got_a.stdout.split() == ["a-1", b"subtype a".hex()]


def test_concurrent_clients_on_one_subtype_each_get_their_own(daemon, stub):
    contents = {f"c-{i}": f"enclave {i}".encode() for i in range(4)}
    for cache_id, content in contents.items():
        published_check_in(daemon, stub, cache_id, content)

    with concurrent.futures.ThreadPoolExecutor(6) as executor:
        results = list(executor.map(
            lambda i: run_client(daemon, "check-out", f"o-{i}", SUBTYPE), range(6)))

    got = [r.stdout.split() for r in results if r.stdout.strip() != "none"]
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert sorted(got) == sorted([k, v.hex()] for k, v in contents.items())
    assert daemon.proc.poll() is None


def test_save_final_of_unknown_id_is_not_found(stub):
    code, details = code_of(stub.SaveFinalCache, pb.SaveCacheRequest(
        cache=pb.Cache(type=POOL, subType=SUBTYPE, ID="never-saved")))
    assert code == grpc.StatusCode.NOT_FOUND and "never-saved" in details


def test_save_cache_without_a_cache_is_invalid(daemon, stub):
    for method in (stub.SaveCache, stub.SaveFinalCache):
        code, details = code_of(method, pb.SaveCacheRequest())
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("cache: missing")
    assert stub.Healthz(pb.HealthzRequest()).ok


def test_two_clients_saving_one_id_at_once(daemon, stub):
    def save(_):
        try:
            return stub.SaveCache(legacy_save_request("twin"), timeout=5).ok
        except grpc.RpcError as e:
            return e.code()

    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        results = list(executor.map(save, range(8)))

    assert results.count(True) == 1
    assert set(results) - {True} == {grpc.StatusCode.ALREADY_EXISTS}
    assert [c.ID for c, _ in listed(stub)] == ["twin"]


def test_save_cache_whose_fd_never_arrives(quick_daemon):
    with grpc.insecure_channel(f"unix:{quick_daemon.grpc_socket}") as channel:
        stub = pb_grpc.EnclavePoolManagerStub(channel)
        assert stub.SaveCache(legacy_save_request("lost")).ok
        assert (quick_daemon.run_dir / "lost").exists()

        deadline = time.monotonic() + 10
        while listed(stub) and time.monotonic() < deadline:
            time.sleep(0.1)

        code, message = code_of(stub.SaveFinalCache, pb.SaveCacheRequest(
            cache=pb.Cache(type=POOL, subType=SUBTYPE, ID="lost")))
        assert code == grpc.StatusCode.NOT_FOUND
        assert "dropped when its fd was due: no client connected" in message
        assert not (quick_daemon.run_dir / "lost").exists()
        assert stub.SaveCache(legacy_save_request("lost")).ok


def test_list_cache_on_the_enclave_pool(daemon, stub):
    published_check_in(daemon, stub, "l-1", b"x")
    response = stub.ListCache(pb.ListCacheRequest(type=POOL, limit=0))
    assert [c.ID for c in response.caches] == ["l-1"]
    code, _ = code_of(stub.ListCache, pb.ListCacheRequest(type=POOL, limit=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_get_cache_naming_a_waiting_check_in_is_refused(daemon, stub):
    """The daemon must not connect to its own listener and check in to itself."""
    published_check_in(daemon, stub, "pooled", b"pooled")
    assert stub.SaveCache(legacy_save_request("waiting")).ok

    code, details = code_of(stub.GetCache, pb.GetCacheRequest(
        type=POOL, subType=SUBTYPE, ID="waiting"))

    assert code == grpc.StatusCode.ALREADY_EXISTS and "waiting" in details
    assert wait_for_state(stub, "pooled", "available")


def test_get_cache_gives_up_within_the_callers_deadline(daemon, stub):
    published_check_in(daemon, stub, "kept", b"kept")
    started = time.monotonic()

    code, _ = code_of(lambda r: stub.GetCache(r, timeout=0.5), pb.GetCacheRequest(
        type=POOL, subType=SUBTYPE, ID="nobody-listens"))

    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 1.5
    assert wait_for_state(stub, "kept", "available")


def test_rune_check_in_of_fd_0_with_empty_layout_is_refused(stub):
    cache = pb.Cache(type=POOL, subType=SUBTYPE, ID="rune-1")
    cache.options.Pack(pb.Enclave(fd=0, nr=0))
    code, details = code_of(stub.SaveCache, pb.SaveCacheRequest(cache=cache))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "layout" in details


def test_a_checked_out_enclave_checked_in_again_at_once_is_taken(daemon, stub):
    """conc.py's race: a published client checks the enclave it just got
    back in over the hand-off socket at once, still connected to the
    daemon's sending socket. A published check-out leaves the table before
    GetCache answers, so the check-in is neither refused as a duplicate nor
    is the enclave lost from the pool."""
    import array
    import os
    import socket

    from test_handoff import Client as HandoffClient, pool_one
    from test_handoff import enclave

    pool_one(daemon.handoff_socket)
    handoff = HandoffClient(daemon.handoff_socket)
    replies = []
    for i in range(10):
        cache_id = f"again-{i}"
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(daemon.run_dir / cache_id))
            listener.listen(1)
            got = stub.GetCache(pb.GetCacheRequest(type=POOL, subType=SUBTYPE,
                                                   ID=cache_id), timeout=5)
            assert got.cache.ID
            conn, _ = listener.accept()
            _, ancdata, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
            fd = array.array("i", ancdata[0][2])[0]
            replies.append(handoff.call(hpb.HandoffRequest(
                check_in=hpb.CheckIn(subtype=SUBTYPE, enclave=enclave(),
                                     available=True)), fd=fd)[0])
            conn.close()
        os.close(fd)
    handoff.close()

    assert [(r.code, r.message) for r in replies] == [(0, "")] * 10
    assert [(c.ID, c.options.type_url != "") for c, _ in listed(stub)] == [
        (replies[-1].id, True)]


# In-process: the hand-off core with a pool; a published client's listener
# is a process of its own (the daemon refuses a listener that is itself).

LISTENER = r"""
import socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(1)
print("listening", flush=True)
sys.stdin.readline()
"""
WAIT = 10


def until(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def add_available(pool):
    entry_id = pool.check_in("skeleton", None, LAYOUT, os.memfd_create("test"),
                             Owner(pid=1, uid=0))
    pool.save_final(entry_id)
    return entry_id


def _outcome(call, *args):
    """The name of the error ``call(*args)`` raised, or "ok"."""
    try:
        call(*args)
    except Exception as e:
        return type(e).__name__
    return "ok"


def no_thread(*args):
    raise RuntimeError("can't start new thread")


@pytest.fixture
def core(tmp_path):
    """A pool with one available enclave, and the legacy hand-off on it."""
    pool = Pool(8, 8)
    entry_id = add_available(pool)
    yield pool, entry_id, LegacyHandoff(pool, str(tmp_path), PeerPolicy())
    pool.close()


@pytest.fixture
def published_listener():
    """Start another process listening on ``path`` (never accepting).

    Every listener is killed by its pid at the end of the test.
    """
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "listening"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=WAIT)


def test_stop_ends_a_check_out_that_waits_for_its_listener(core):
    """stop() does not wait out a GetCache still retrying its connect: the
    call fails, its enclave never left, and it is back in the pool."""
    pool, entry_id, legacy = core
    got = []
    check_out = threading.Thread(target=lambda: got.append(_outcome(
        legacy.get_cache, "late-1", "skeleton", 4 * WAIT)))
    check_out.start()
    until(lambda: legacy._late_waits == 1)

    legacy.stop()
    check_out.join(WAIT)

    assert got == ["Unavailable"]
    assert pool.get(entry_id).state is State.AVAILABLE


def test_a_check_out_waiting_for_its_listener_holds_no_enclave(
        core, tmp_path, published_listener):
    """A GetCache naming a listener that is not there yet waits without a
    lease: the only enclave goes to the client that does listen."""
    pool, entry_id, _ = core
    legacy = LegacyHandoff(pool, str(tmp_path), PeerPolicy(),
                           connect_timeout=4 * WAIT)
    got = []
    waiting = threading.Thread(target=lambda: got.append(_outcome(
        legacy.get_cache, "absent-1", "skeleton")))
    waiting.start()
    until(lambda: legacy._late_waits == 1)
    published_listener(tmp_path / "present-1")

    assert legacy.get_cache("present-1", "skeleton").id == entry_id
    legacy.stop()
    waiting.join(WAIT)
    assert got == ["Unavailable"]


def test_only_a_few_check_outs_wait_for_a_late_listener(core, tmp_path):
    """Each wait holds a gRPC thread: past _MAX_LATE_WAITS one fails at once,
    so that GetCache calls naming no listener cannot take every thread."""
    pool, _, _ = core
    for _ in range(2):
        add_available(pool)
    # Waits far longer than the test: only the cap or stop() can end them.
    legacy = LegacyHandoff(pool, str(tmp_path), PeerPolicy(),
                           connect_timeout=4 * WAIT)
    got = []
    waiting = [threading.Thread(target=lambda i=i: got.append(_outcome(
        legacy.get_cache, f"nobody-{i}", "skeleton"))) for i in range(2)]
    for thread in waiting:
        thread.start()
    until(lambda: legacy._late_waits == 2)

    started = time.monotonic()
    with pytest.raises(Unavailable, match="wait for theirs already"):
        legacy.get_cache("nobody-2", "skeleton")
    assert time.monotonic() - started < WAIT
    legacy.stop()
    for thread in waiting:
        thread.join(WAIT)
    assert got == ["Unavailable"] * 2
    assert {e.state for e in pool.entries()} == {State.AVAILABLE}


def test_check_out_refuses_a_symlink_in_place_of_the_listener(core, tmp_path,
                                                              published_listener):
    pool, entry_id, legacy = core
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    published_listener(elsewhere / "victim")
    (tmp_path / "link-1").symlink_to(elsewhere / "victim")

    with pytest.raises(Unavailable, match="is not a socket"):
        legacy.get_cache("link-1", "skeleton")

    assert pool.get(entry_id).state is State.AVAILABLE


def test_check_in_that_cannot_wait_for_its_fd_leaves_nothing(core, tmp_path,
                                                            monkeypatch):
    pool, _, legacy = core
    monkeypatch.setattr(legacy._workers, "submit", no_thread)
    options = legacy_save_request("gone-1").cache.options

    with pytest.raises(Unavailable, match="cannot wait for the fd"):
        legacy.save_cache("gone-1", "skeleton", options)

    assert not (tmp_path / "gone-1").exists()
    with pytest.raises(NotFound):
        pool.get("gone-1")
    monkeypatch.undo()
    legacy.save_cache("gone-1", "skeleton", options)  # the ID is free again
    assert pool.get("gone-1").state is State.PENDING
    legacy.stop()


def test_a_new_check_in_of_an_id_forgets_the_old_refusal(core, tmp_path):
    pool, _, _ = core
    legacy = LegacyHandoff(pool, str(tmp_path), PeerPolicy(), accept_timeout=0.1)
    options = legacy_save_request("again-1").cache.options
    legacy.save_cache("again-1", "skeleton", options)
    # Refused, then its ID given back (the entry dropped first).
    until(lambda: legacy.refusal("again-1") is not None
          and "again-1" not in legacy._busy_ids)
    assert "no client connected" in legacy.refusal("again-1")

    legacy.save_cache("again-1", "skeleton", options)

    assert legacy.refusal("again-1") is None
    legacy.stop()
