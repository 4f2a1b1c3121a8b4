"""Published clients against our daemon, and what crashes the published daemon.

``legacy_client.py`` behaves as the published Go client (Healthz first, a
new connection per call, 1 s deadlines) and runs in its own processes.
"""

import concurrent.futures
import pathlib
import subprocess
import sys
import time

import grpc
import pytest

from conftest import REPO
from epm_api import handoff_pb2 as hpb
from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc
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

        code, _ = code_of(stub.SaveFinalCache, pb.SaveCacheRequest(
            cache=pb.Cache(type=POOL, subType=SUBTYPE, ID="lost")))
        assert code == grpc.StatusCode.NOT_FOUND
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
    back in over the hand-off socket before the daemon's confirming thread
    saw the fd read (it looks at growing intervals, up to 50 ms). The check-in settles the check-out: it is neither
    refused as a duplicate nor is the enclave lost from the pool."""
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
            # Still connected: the daemon sees the read only when it looks.
            replies.append(handoff.call(hpb.HandoffRequest(
                check_in=hpb.CheckIn(subtype=SUBTYPE, enclave=enclave(),
                                     available=True)), fd=fd)[0])
            conn.close()
        os.close(fd)
    handoff.close()

    assert [(r.code, r.message) for r in replies] == [(0, "")] * 10
    assert [(c.ID, c.options.type_url != "") for c, _ in listed(stub)] == [
        (replies[-1].id, True)]
