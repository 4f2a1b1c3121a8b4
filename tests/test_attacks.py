"""Attacks found against the daemon (findings 1-10), each refused now.

Each test replays what an attacker did, against a live daemon (or the core
where the attack needs the daemon's own process), and checks the refusal.
"""

import os
import socket
import time

import grpc
import pytest

from conftest import Daemon
from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc
from epm_server.enclave import Identity, LayoutEntry
from epm_server.errors import AlreadyExists, Unavailable
from epm_server.legacy import LegacyHandoff
from epm_server.peers import PeerPolicy
from epm_server.pool import Owner, Pool, State
from test_handoff import Client, enclave, pool_one, sealed_memfd
from test_service import (
    POOL, code_of, legacy_save_request, listed, send_fd, wait_for_state)

SUBTYPE = "skeleton-0.0.0"


@pytest.fixture
def stub(daemon):
    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}") as channel:
        yield pb_grpc.EnclavePoolManagerStub(channel)


def stub_of(daemon):
    return pb_grpc.EnclavePoolManagerStub(
        grpc.insecure_channel(f"unix:{daemon.grpc_socket}"))


# 1. One enclave checked in twice would go to two clients.

def test_same_memfd_checked_in_twice_is_refused_naming_the_first(daemon, stub):
    fd = sealed_memfd()
    client = Client(daemon.handoff_socket)
    first = client.check_in(fd)

    again = client.check_in(fd)
    reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    through_other_fd = client.check_in(reopened)

    assert first.code == 0
    assert again.code == 6 and first.id in again.message
    assert through_other_fd.code == 6 and first.id in through_other_fd.message
    assert [c.ID for c, _ in listed(stub)] == [first.id]
    client.close()
    os.close(reopened)
    os.close(fd)


def test_memfd_may_come_back_once_its_entry_left(daemon, stub):
    fd = sealed_memfd()
    first = pool_one(daemon.handoff_socket, os.dup(fd))
    assert stub.DeleteCache(pb.DeleteCacheRequest(type=POOL, ID=first)).ok

    client = Client(daemon.handoff_socket)
    reply = client.check_in(fd)

    assert reply.code == 0, reply.message
    client.close()
    os.close(fd)


def test_legacy_check_in_of_a_pooled_memfd_is_discarded(daemon, stub):
    fd = sealed_memfd()
    pooled = pool_one(daemon.handoff_socket, os.dup(fd))
    assert stub.SaveCache(legacy_save_request("dup-legacy")).ok

    send_fd(daemon.run_dir / "dup-legacy", fd)
    os.close(fd)

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(listed(stub)) > 1:
        time.sleep(0.05)
    assert [c.ID for c, _ in listed(stub)] == [pooled]
    refused = daemon.events("legacy_check_in_failed")
    assert refused and pooled in refused[0]["reason"]


def test_pool_tells_enclave_device_fds_apart_by_open_file():
    """Every /dev/sgx_enclave fd has the device's inode: kcmp decides."""
    pool = Pool(8, 8)
    ident = Identity(b"\1" * 32, b"\2" * 32, 4, 3, 8192, "sgx")
    layout = (LayoutEntry(0x10000, 8192, True, True, False, True, False),)
    owner = Owner(pid=1, uid=0)
    first = os.open("/dev/null", os.O_RDONLY)
    second = os.open("/dev/null", os.O_RDONLY)
    dup = os.dup(first)

    pool.check_in(SUBTYPE, ident, layout, first, owner)
    pool.check_in(SUBTYPE, ident, layout, second, owner)
    with pytest.raises(AlreadyExists, match="same open file"):
        pool.check_in(SUBTYPE, ident, layout, dup, owner)

    os.close(dup)
    pool.close()


# 2. gRPC SaveFinalCache knows no caller: it must not free a watched enclave.

def test_grpc_save_final_of_a_hand_off_entry_is_refused(daemon, stub):
    fd = sealed_memfd()
    client = Client(daemon.handoff_socket)
    held = client.check_in(fd)

    code, details = code_of(stub.SaveFinalCache, pb.SaveCacheRequest(
        cache=pb.Cache(type=POOL, ID=held.id)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "goes over the hand-off socket" in details
    assert wait_for_state(stub, held.id, "held")
    assert client.save_final(held.id).code == 0
    client.close()
    os.close(fd)


# 3. A layout the identity's size cannot hold maps memory the enclave lacks.

def layout_of(*ranges):
    return [pb.Enclavelayout(addr=addr, size=size,
                             prot=pb.EnclavePerms(read=True, share=True))
            for addr, size in ranges]


@pytest.mark.parametrize("ranges, message", [
    ([(0x10000000, 0x800000)], "outside the enclave's 0x2000 bytes"),
    ([(0, 8192)], "below 0x1000"),
    ([(0x10001000, 8192)], "outside the enclave's 0x2000 bytes at 0x10000000"),
    ([(0x10000000, 4096), (0x10002000, 4096)], "layout[1]"),
])
def test_layout_outside_the_identity_size_is_refused(daemon, ranges, message):
    enc = enclave()
    del enc.layout[:]
    enc.layout.extend(layout_of(*ranges))
    enc.nr = len(ranges)
    fd = sealed_memfd()
    client = Client(daemon.handoff_socket)

    reply = client.check_in(fd, enc=enc)

    assert reply.code == 3 and message in reply.message, reply.message
    client.close()
    os.close(fd)


def test_legacy_layout_must_fit_identity_or_fd_size(daemon, stub):
    request = legacy_save_request("too-big", with_identity=True)
    enc = pb.Enclave()
    request.cache.options.Unpack(enc)
    enc.layout[0].size = 0x100000
    request.cache.options.Pack(enc)
    code, details = code_of(stub.SaveCache, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in details

    enc.ClearField("identity")
    request.cache.options.Pack(enc)
    assert stub.SaveCache(request).ok
    fd = sealed_memfd()
    send_fd(daemon.run_dir / "too-big", fd)
    os.close(fd)

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and listed(stub):
        time.sleep(0.05)
    assert listed(stub) == []
    assert "outside" in daemon.events("legacy_check_in_failed")[0]["reason"]


# 4. Idle connections must not lock everybody out of the hand-off socket.

def test_uid_past_its_share_evicts_its_longest_idle_connection(make_daemon):
    daemon = make_daemon("[handoff]\nmax_connections_per_uid = 3\n")
    idle = [Client(daemon.handoff_socket) for _ in range(3)]
    time.sleep(0.2)

    newcomer = Client(daemon.handoff_socket)
    reply, _ = newcomer.check_out()

    assert reply.code == 0
    assert idle[0].recv() is None  # the longest idle was closed
    assert idle[2].check_out()[0].code == 0
    assert daemon.events("handoff_connection_evicted")
    for client in (*idle, newcomer):
        client.close()


def test_full_table_evicts_the_longest_idle_not_one_mid_frame(make_daemon):
    daemon = make_daemon("[handoff]\nmax_connections = 3\n")
    busy = Client(daemon.handoff_socket)
    busy.sock.sendall(b"\x10")  # the first byte of a frame: mid-request
    time.sleep(0.2)
    idle = [Client(daemon.handoff_socket) for _ in range(2)]
    time.sleep(0.2)

    newcomer = Client(daemon.handoff_socket)

    assert newcomer.check_out()[0].code == 0
    assert idle[0].recv() is None
    busy.sock.sendall(b"\x00\x00\x00" + b"\x00" * 16)
    assert busy.recv()[0].code == 3  # still served, though garbage
    for client in (busy, *idle, newcomer):
        client.close()


def test_connections_all_mid_frame_refuse_the_newcomer(make_daemon):
    daemon = make_daemon("[handoff]\nmax_connections_per_uid = 2\n")
    busy = [Client(daemon.handoff_socket) for _ in range(2)]
    for client in busy:
        client.sock.sendall(b"\x10")
    time.sleep(0.2)

    newcomer = Client(daemon.handoff_socket)

    reply, _ = newcomer.recv()
    assert reply.code == 8 and "at most 2" in reply.message
    for client in (*busy, newcomer):
        client.close()


# 5. The daemon must never hand an enclave to itself.

def test_get_cache_to_the_daemons_own_listener_is_refused(tmp_path):
    pool = Pool(8, 8)
    legacy = LegacyHandoff(pool, str(tmp_path), PeerPolicy(), connect_timeout=0.2)
    fd = sealed_memfd()
    entry_id = pool.check_in(SUBTYPE, None, (), fd, Owner(pid=1, uid=0),
                             origin="legacy")
    pool.save_final(entry_id)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "mine"))
    listener.listen(1)

    with pytest.raises(Unavailable, match="is the daemon"):
        legacy.get_cache("mine", SUBTYPE)

    assert pool.get(entry_id).state is State.AVAILABLE
    listener.close()
    legacy.stop()
    pool.close()


# 6. Legacy sockets left by a killed daemon blocked their IDs for good.

def test_stale_legacy_sockets_are_removed_at_start(tmp_path):
    daemon = Daemon(tmp_path)
    daemon.run_dir.mkdir(mode=0o700)
    leftovers = {}
    for name in ("stale-1", "not.an.id", "live-1"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(daemon.run_dir / name))
        leftovers[name] = sock
    leftovers["live-1"].listen(1)
    leftovers["stale-1"].close()
    leftovers["not.an.id"].close()
    (daemon.run_dir / "plain").write_text("")

    daemon.start()
    try:
        assert sorted(os.listdir(daemon.run_dir)) == [
            "epm-handoff.sock", "epm.sock", "live-1", "not.an.id", "plain"]
        removed = daemon.events("stale_legacy_socket_removed")
        assert [r["path"] for r in removed] == [str(daemon.run_dir / "stale-1")]
        assert stub_of(daemon).SaveCache(legacy_save_request("stale-1")).ok
    finally:
        daemon.stop()
        leftovers["live-1"].close()


# 9. A message must not echo a megabyte back (gRPC metadata is bounded).

@pytest.mark.parametrize("method, request_of", [
    ("ListCache", lambda big: pb.ListCacheRequest(type=big)),
    ("SaveCache", lambda big: legacy_save_request(big)),
    ("DeleteCache", lambda big: pb.DeleteCacheRequest(type=POOL, ID=big)),
    ("PickCache", lambda big: pb.PickCacheRequest(type=POOL, filters={big: "1"})),
    ("GetCache", lambda big: pb.GetCacheRequest(
        type="bundle-cache.occlum.cache0", subType=big, ID="x")),
])
def test_error_messages_cut_the_callers_value(stub, method, request_of):
    big = "x" * 1000000

    code, details = code_of(getattr(stub, method), request_of(big))

    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert "...(1000000 chars)" in details and len(details) < 300


# 10. Legacy check-ins that never come must not crowd out real enclaves.

def test_pending_check_ins_have_their_own_limit(make_daemon):
    daemon = make_daemon("[legacy]\nmax_pending = 3\n[pool]\nmax_per_identity = 2\n")
    stub = stub_of(daemon)
    for i in range(2):
        assert stub.SaveCache(legacy_save_request(f"never-{i}")).ok

    assert stub.SaveCache(legacy_save_request("real")).ok
    fd = sealed_memfd()
    send_fd(daemon.run_dir / "real", fd)
    os.close(fd)
    assert wait_for_state(stub, "real", "held")
    assert stub.SaveCache(legacy_save_request("never-2")).ok
    code, details = code_of(stub.SaveCache, legacy_save_request("never-3"))

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 legacy check-ins are waiting" in details
