"""Owner death: clients that die holding, receiving or mid hand-off cost nothing."""

import array
import os
import random
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest

from conftest import REPO
from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc
from test_handoff import CONTENT, Client, pool_one, wait_for_fds
from test_load import WORKER, entries, wait_until

POOL = "enclave-cache-pool"
SUBTYPE = "skeleton-0.0.0"

# Run in another process: ask for a check-out, then never read the reply.
SILENT_CHECK_OUT = """
import socket, sys, time
from epm_api import framing, handoff_pb2 as hpb, v1alpha1_pb2 as pb
ident = pb.EnclaveIdentity(mrenclave=b"\\x11" * 32, mrsigner=b"\\x22" * 32,
                           attributes=4, xfrm=3, size=8192, backend="sim")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
req = hpb.HandoffRequest(check_out=hpb.CheckOut(subtype="skeleton-0.0.0",
                                                identity=ident))
framing.send_frame(sock, req.SerializeToString(), time.monotonic() + 5)
print("sent", flush=True)
time.sleep(60)
"""


@pytest.fixture
def stub(daemon):
    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}") as channel:
        yield pb_grpc.EnclavePoolManagerStub(channel)


def test_client_killed_before_reading_a_check_out_leaves_nothing_behind(
        daemon, stub):
    """The kernel closes the unread fd; the daemon closes its own copy,
    since an unread reply does not prove the fd was never taken."""
    stub.Healthz(pb.HealthzRequest())  # the gRPC connection counts from now
    baseline = daemon.open_fds()
    entry_id = pool_one(daemon.handoff_socket)
    child = subprocess.Popen(
        [sys.executable, "-c", SILENT_CHECK_OUT, str(daemon.handoff_socket)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline() == "sent\n"
        assert wait_until(lambda: entries(stub).get(entry_id) == "leased")

        child.send_signal(signal.SIGKILL)
        child.wait(10)

        assert wait_until(lambda: entry_id not in entries(stub), 5)
    finally:
        child.kill()
        child.wait()
    assert wait_for_fds(daemon, baseline) == baseline
    client = Client(daemon.handoff_socket)
    reply, fds = client.check_out()
    assert not reply.id and fds == []
    client.close()


def _get_cache(daemon, stub, cache_id, listener):
    listener.bind(str(daemon.run_dir / cache_id))
    listener.listen(1)
    return stub.GetCache(pb.GetCacheRequest(type=POOL, subType=SUBTYPE,
                                            ID=cache_id), timeout=5)


def test_legacy_check_out_is_handed_out_once_sent(daemon, stub):
    """A published client may accept after GetCache answers, or never: the
    enclave is its own from the moment its fd is queued."""
    entry_id = pool_one(daemon.handoff_socket)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    response = _get_cache(daemon, stub, "never", listener)

    assert response.cache.ID == entry_id
    assert entry_id not in entries(stub)
    os.unlink(daemon.run_dir / "never")
    listener.close()  # as at the client's death: the kernel drops the fd


@pytest.mark.parametrize("take", ["late", "peek"])
def test_legacy_client_holds_its_enclave_alone(daemon, stub, take):
    """Accepted late, or taken with MSG_PEEK and the byte left unread, the
    fd is the client's: the next check-out does not get the same enclave."""
    entry_id = pool_one(daemon.handoff_socket)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _get_cache(daemon, stub, "taker", listener)
    if take == "late":
        time.sleep(0.5)
    conn, _ = listener.accept()
    flags = socket.MSG_PEEK if take == "peek" else 0
    _, ancdata, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4), flags)
    fd = array.array("i", ancdata[0][2])[0]
    conn.close()
    listener.close()
    os.unlink(daemon.run_dir / "taker")

    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert not _get_cache(daemon, stub, "second", second).HasField("cache")
    finally:
        second.close()
        os.unlink(daemon.run_dir / "second")
    assert os.pread(fd, len(CONTENT), 0) == CONTENT
    assert entry_id not in entries(stub)
    os.close(fd)


def test_clients_killed_at_random_points_leak_nothing(daemon, stub, tmp_path):
    claims = tmp_path / "claims"
    claims.mkdir()
    stub.Healthz(pb.HealthzRequest())
    baseline = daemon.open_fds()
    rng = random.Random(6)

    for seed in range(12):
        worker = subprocess.Popen(
            [sys.executable, str(WORKER), str(daemon.grpc_socket), str(claims),
             "100000", "30", str(seed)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        time.sleep(0.25 + rng.random() * 0.2)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)

    # Held enclaves of the dead go to the reaper; leased ones whose reply
    # was sent are closed, those whose reply was not are available again.
    assert wait_until(lambda: set(entries(stub).values()) <= {"available"}, 10)
    available = entries(stub)
    assert wait_for_fds(daemon, baseline + len(available)) == \
        baseline + len(available)
    for pool_id in available:
        stub.DeleteCache(pb.DeleteCacheRequest(type=POOL, ID=pool_id))
    assert wait_for_fds(daemon, baseline) == baseline
    assert daemon.proc.poll() is None
