"""The client library against a live daemon, across real processes."""

import fcntl
import mmap
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from epm_api import framing
from epm_api import handoff_pb2 as hpb
from epm_client import (Client, DaemonUnavailable, Identity, LayoutEntry,
                        NotFound)
from epm_client import client as client_module

SIZE = 1 << 20
BASE = 0x7E0000000000
LAYOUT = [LayoutEntry(BASE, 4096), LayoutEntry(BASE + 4096, SIZE - 4096, execute=True)]


def identity(mrenclave=b"\x11" * 32):
    return Identity(mrenclave=mrenclave, mrsigner=b"\x22" * 32, attributes=0x4,
                    xfrm=0x3, size=SIZE, backend="sim")


def sealed_memfd(content):
    """A memfd shaped like a sim enclave, holding ``content`` at offset 0."""
    fd = os.memfd_create("epm-sim-enclave", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, content, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def pooled(client, content, subtype="skeleton-0.0.0", ident=None):
    """Check in a memfd holding ``content`` and make it available."""
    fd = sealed_memfd(content)
    try:
        pool_id = client.check_in(fd, subtype, LAYOUT, ident or identity())
        client.save_final(pool_id)
    finally:
        os.close(fd)
    return pool_id


def run_python(code, *args):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=60)


def test_enclave_travels_between_two_processes(daemon):
    """One process checks an enclave in; another checks it out and reads it."""
    builder = run_python(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_client import Client, pooled
        with Client(sys.argv[1]) as c:
            print(pooled(c, b"written by the builder"))
        """, str(daemon.grpc_socket))
    assert builder.returncode == 0, builder.stderr

    receiver = run_python(f"""
        import mmap, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_client import Client, identity
        with Client(sys.argv[1]) as c:
            got = c.check_out("skeleton-0.0.0", identity())
        with mmap.mmap(got.fd, 4096, mmap.MAP_SHARED) as m:
            print(m[:22].decode(), got.pool_id, len(got.layout))
        """, str(daemon.grpc_socket))
    assert receiver.returncode == 0, receiver.stderr
    assert receiver.stdout.split() == [
        "written", "by", "the", "builder", builder.stdout.strip(), "2"]


def test_checked_out_enclave_leaves_the_pool(daemon):
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"only once")
        first = client.check_out("skeleton-0.0.0", identity())
        try:
            assert first is not None
            assert client.check_out("skeleton-0.0.0", identity()) is None
            assert client.list() == []
        finally:
            os.close(first.fd)


def test_empty_pool_checks_out_nothing(daemon):
    with Client(daemon.grpc_socket) as client:
        assert client.check_out("skeleton-0.0.0", identity()) is None


def test_check_out_matches_subtype_and_identity(daemon):
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"x")
        assert client.check_out("other-1.0", identity()) is None
        assert client.check_out("skeleton-0.0.0", identity(b"\x99" * 32)) is None
        got = client.check_out("skeleton-0.0.0", identity())
        assert got is not None
        os.close(got.fd)


def test_held_enclave_is_listed_until_saved(daemon):
    with Client(daemon.grpc_socket) as client:
        fd = sealed_memfd(b"held")
        try:
            pool_id = client.check_in(fd, "skeleton-0.0.0", LAYOUT, identity())
        finally:
            os.close(fd)
        [entry] = client.list()
        assert (entry.id, entry.state) == (pool_id, "held")
        assert client.check_out("skeleton-0.0.0", identity()) is None

        client.save_final(pool_id)
        [entry] = client.list()
        assert entry.state == "available"
        assert entry.identity == identity()
        assert list(entry.layout) == LAYOUT


def test_save_final_of_unknown_id_is_not_found(daemon):
    with Client(daemon.grpc_socket) as client:
        with pytest.raises(NotFound):
            client.save_final("0123456789abcdef")


def test_flush_closes_available_enclaves_of_one_subtype(daemon):
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"a", subtype="keep-me")
        pooled(client, b"b")
        pooled(client, b"c")
        assert client.flush("skeleton-0.0.0") == (2, 0)
        assert [e.subtype for e in client.list()] == ["keep-me"]
        assert client.flush() == (1, 0)
        assert client.list() == []


def test_daemon_down_is_unavailable(tmp_path):
    client = Client(tmp_path / "epm.sock")
    with pytest.raises(DaemonUnavailable):
        client.check_out("skeleton-0.0.0", identity())
    with pytest.raises(DaemonUnavailable):
        client.list()


def test_checked_out_fd_maps_the_same_memory(daemon):
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"\xabcontent")
        got = client.check_out("skeleton-0.0.0", identity())
    try:
        with mmap.mmap(got.fd, SIZE, mmap.MAP_SHARED) as m:
            assert m[:8] == b"\xabcontent"
            assert m[SIZE - 1] == 0
    finally:
        os.close(got.fd)


def test_check_out_with_hold_returns_the_held_entrys_id(daemon):
    with Client(daemon.grpc_socket) as client:
        pool_id = pooled(client, b"held")
        got = client.check_out("skeleton-0.0.0", identity(), hold=True)
        try:
            assert got.pool_id == pool_id
            assert os.pread(got.fd, 4, 0) == b"held"
            assert client.check_out("skeleton-0.0.0", identity()) is None
            assert [e.state for e in client.list()] == ["held"]
            client.save_final(got.pool_id)
            assert [e.state for e in client.list()] == ["available"]
        finally:
            os.close(got.fd)


def test_save_final_with_discard_removes_the_held_enclave(daemon):
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"bad")
        got = client.check_out("skeleton-0.0.0", identity(), hold=True)
        os.close(got.fd)
        client.save_final(got.pool_id, discard=True)
        assert client.list() == []


def test_check_in_available_needs_no_save_final(daemon):
    with Client(daemon.grpc_socket) as client:
        fd = sealed_memfd(b"ready")
        try:
            pool_id = client.check_in(fd, "skeleton-0.0.0", LAYOUT, identity(),
                                      available=True)
        finally:
            os.close(fd)
        assert [(e.id, e.state) for e in client.list()] == [(pool_id, "available")]

        got = client.check_out("skeleton-0.0.0", identity())
        try:
            assert os.pread(got.fd, 5, 0) == b"ready"
        finally:
            os.close(got.fd)


def test_a_client_stops_polling_for_replies_that_come_late(monkeypatch):
    """Polling for a reply is worth it only while replies come at once."""
    polls = []
    real_poll = client_module._poll_reply
    monkeypatch.setattr(client_module, "_poll_reply",
                        lambda conn, s: polls.append(s) or real_poll(conn, s))
    ours, daemons = socket.socketpair()
    reply = hpb.HandoffReply(code=0, id="x").SerializeToString()

    def slow_daemon():
        while framing.recv_frame(daemons, time.monotonic() + 5) is not None:
            time.sleep(0.001)
            framing.send_frame(daemons, reply, time.monotonic() + 5)

    thread = threading.Thread(target=slow_daemon)
    thread.start()
    client = Client("/nonexistent/epm.sock")
    client._conn = ours
    requests = client_module._SPIN_MISSES + client_module._SPIN_BACKOFF + 1

    for _ in range(requests):
        client.save_final("x")

    client.close()
    thread.join()
    daemons.close()
    assert len(polls) == client_module._SPIN_MISSES + 1
