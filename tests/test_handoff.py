"""Our hand-off socket against a live daemon, with a raw client built here.

The client speaks ``epm_api.framing`` and ``handoff_pb2`` directly, so these
tests pin down the protocol itself, not a client library's view of it.
"""

import array
import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from epm_api import framing
from epm_api import handoff_pb2 as hpb
from epm_api import v1alpha1_pb2 as pb

SIZE = 8192
CONTENT = b"enclave memory \x00\x01\x02 end"
F_ADD_SEALS = 1033
SEALS = 0x2 | 0x4  # F_SEAL_SHRINK | F_SEAL_GROW


def identity(mrenclave=b"\x11" * 32, size=SIZE):
    return pb.EnclaveIdentity(mrenclave=mrenclave, mrsigner=b"\x22" * 32,
                              attributes=4, xfrm=3, size=size, backend="sim")


def enclave(ident=None, size=SIZE):
    return pb.Enclave(nr=1, identity=ident or identity(), layout=[
        pb.Enclavelayout(addr=0x10000000, size=size,
                         prot=pb.EnclavePerms(read=True, write=True, share=True))])


def sealed_memfd(size=SIZE, content=CONTENT, seals=SEALS):
    fd = os.memfd_create("enclave", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, content, 0)
    if seals:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    return fd


class Client:
    """A connection to the hand-off socket, one request at a time."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))

    def close(self):
        self.sock.close()

    def send_raw(self, payload, fd=None):
        framing.send_frame(self.sock, payload, time.monotonic() + 5, fd=fd)

    def recv(self):
        """The next reply and its fds, or None when the daemon closed."""
        frame = framing.recv_frame(self.sock, time.monotonic() + 5)
        if frame is None:
            return None
        payload, fds = frame
        return hpb.HandoffReply.FromString(payload), fds

    def call(self, request, fd=None):
        self.send_raw(request.SerializeToString(), fd=fd)
        return self.recv()

    def check_in(self, fd, subtype="skeleton-0.0.0", enc=None):
        reply, _ = self.call(hpb.HandoffRequest(check_in=hpb.CheckIn(
            subtype=subtype, enclave=enc or enclave())), fd=fd)
        return reply

    def save_final(self, entry_id):
        reply, _ = self.call(hpb.HandoffRequest(
            save_final=hpb.SaveFinal(id=entry_id)))
        return reply

    def check_out(self, subtype="skeleton-0.0.0", ident=None):
        return self.call(hpb.HandoffRequest(check_out=hpb.CheckOut(
            subtype=subtype, identity=ident or identity())))


def pool_one(path, fd=None):
    """Check a sealed memfd in and make it available; return its ID."""
    client = Client(path)
    fd = sealed_memfd() if fd is None else fd
    try:
        reply = client.check_in(fd)
        assert reply.code == 0, reply.message
        assert client.save_final(reply.id).code == 0
        return reply.id
    finally:
        os.close(fd)
        client.close()


def wait_for_fds(daemon, baseline, timeout=5):
    """Connection threads close asynchronously: wait for the count to settle."""
    deadline = time.monotonic() + timeout
    while daemon.open_fds() != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon.open_fds()


# Run in another process: check out, map the fd, print what the memory holds.
CHECK_OUT_CHILD = """
import mmap, socket, sys, time
from epm_api import framing, handoff_pb2 as hpb, v1alpha1_pb2 as pb
ident = pb.EnclaveIdentity(mrenclave=b"\\x11" * 32, mrsigner=b"\\x22" * 32,
                           attributes=4, xfrm=3, size=8192, backend="sim")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
req = hpb.HandoffRequest(check_out=hpb.CheckOut(subtype="skeleton-0.0.0",
                                                identity=ident))
framing.send_frame(sock, req.SerializeToString(), time.monotonic() + 5)
payload, fds = framing.recv_frame(sock, time.monotonic() + 5)
reply = hpb.HandoffReply.FromString(payload)
assert reply.code == 0 and len(fds) == 1, (reply, fds)
layout = reply.enclave.layout[0]
mem = mmap.mmap(fds[0], layout.size, mmap.MAP_SHARED, mmap.PROT_READ)
print(reply.id, mem[:64].rstrip(b"\\0").hex())
"""


def test_check_out_in_another_process_receives_the_memory(daemon):
    entry_id = pool_one(daemon.handoff_socket)

    child = subprocess.run(
        [sys.executable, "-c", CHECK_OUT_CHILD, str(daemon.handoff_socket)],
        capture_output=True, text=True, timeout=30, cwd=os.getcwd())

    assert child.returncode == 0, child.stderr
    got_id, content = child.stdout.split()
    assert got_id == entry_id
    assert bytes.fromhex(content) == CONTENT


def test_check_out_hands_each_enclave_once(daemon):
    pool_one(daemon.handoff_socket)
    client = Client(daemon.handoff_socket)

    first, first_fds = client.check_out()
    second, second_fds = client.check_out()

    assert first.code == 0 and len(first_fds) == 1
    assert first.enclave.identity == identity()
    assert second.code == 0 and not second.HasField("enclave") and not second_fds
    framing.close_all(first_fds)
    client.close()


def test_empty_pool_answers_ok_without_enclave(daemon):
    client = Client(daemon.handoff_socket)
    reply, fds = client.check_out()
    assert (reply.code, fds, reply.HasField("enclave")) == (0, [], False)
    client.close()


def test_other_identity_or_subtype_does_not_match(daemon):
    pool_one(daemon.handoff_socket)
    client = Client(daemon.handoff_socket)

    other_measurement, fds_a = client.check_out(ident=identity(b"\x33" * 32))
    other_subtype, fds_b = client.check_out(subtype="skeleton-9")

    assert not other_measurement.HasField("enclave") and not fds_a
    assert not other_subtype.HasField("enclave") and not fds_b
    client.close()


def test_held_enclave_is_not_handed_out(daemon):
    client = Client(daemon.handoff_socket)
    fd = sealed_memfd()
    assert client.check_in(fd).code == 0
    os.close(fd)
    reply, fds = client.check_out()
    assert not reply.HasField("enclave") and not fds
    client.close()


def test_save_final_errors(daemon):
    client = Client(daemon.handoff_socket)
    entry_id = pool_one(daemon.handoff_socket)

    unknown = client.save_final("0" * 32)
    twice = client.save_final(entry_id)

    assert unknown.code == 5
    assert twice.code == 9 and "available" in twice.message
    client.close()


def _pipe():
    r, w = os.pipe()
    os.close(w)
    return r


def _regular_file():
    fd, path = tempfile.mkstemp()
    os.ftruncate(fd, SIZE)
    os.unlink(path)
    return fd


@pytest.mark.parametrize("make_fd, what", [
    (_pipe, "pipe"),
    (lambda: sealed_memfd(seals=0), "seals"),
    (_regular_file, "regular file"),
    (lambda: sealed_memfd(size=2 * SIZE), "16384 bytes"),
    (lambda: os.open("/dev/null", os.O_RDWR), "/dev/null"),
    (lambda: socket.socket().detach(), "socket"),
    (lambda: os.open("/", os.O_RDONLY), "directory"),
])
def test_refused_fds_are_named_and_closed(daemon, make_fd, what):
    client = Client(daemon.handoff_socket)
    client.check_out()  # the connection's thread is up: count from here
    baseline = daemon.open_fds()
    fd = make_fd()

    reply = client.check_in(fd)

    os.close(fd)
    assert reply.code == 3 and what in reply.message, reply.message
    assert wait_for_fds(daemon, baseline) == baseline
    client.close()


def test_check_in_needs_exactly_one_fd(daemon):
    client = Client(daemon.handoff_socket)
    client.check_out()
    baseline = daemon.open_fds()
    request = hpb.HandoffRequest(check_in=hpb.CheckIn(
        subtype="skeleton-0.0.0", enclave=enclave())).SerializeToString()
    a, b = sealed_memfd(), sealed_memfd()

    none, _ = client.call(hpb.HandoffRequest.FromString(request))
    header = framing.HEADER.pack(len(request))
    fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
            array.array("i", [a, b]).tobytes())]
    client.sock.sendmsg([header + request], fds)
    two, _ = client.recv()

    os.close(a)
    os.close(b)
    assert none.code == 3 and "got 0" in none.message
    assert two.code == 3 and "got 2" in two.message
    assert wait_for_fds(daemon, baseline) == baseline
    client.close()


def test_bad_layout_and_identity_are_refused(daemon):
    client = Client(daemon.handoff_socket)
    bad_layout = enclave()
    bad_layout.layout[0].addr = 0x10000001
    bad_identity = enclave(ident=identity(mrenclave=b"\x01"))
    no_layout = enclave()
    del no_layout.layout[:]
    no_layout.nr = 0

    replies = [client.check_in(sealed_memfd(), enc=e)
               for e in (bad_layout, bad_identity, no_layout)]

    assert [r.code for r in replies] == [3, 3, 3]
    assert "page-aligned" in replies[0].message
    assert "mrenclave" in replies[1].message
    assert "layout" in replies[2].message
    client.close()


def test_garbage_frame_gets_code_3_and_close(daemon):
    baseline = daemon.open_fds()
    client = Client(daemon.handoff_socket)
    fd = sealed_memfd()

    client.send_raw(b"\xff\xff\xff\xff garbage", fd=fd)
    reply, _ = client.recv()
    after = client.recv()

    os.close(fd)
    assert reply.code == 3
    assert after is None
    client.close()
    assert wait_for_fds(daemon, baseline) == baseline


def test_oversized_frame_gets_code_3(daemon):
    client = Client(daemon.handoff_socket)
    client.sock.sendall(framing.HEADER.pack(framing.MAX_FRAME + 1))
    reply, _ = client.recv()
    assert reply.code == 3 and "exceeds" in reply.message
    client.close()


def test_one_connection_carries_many_requests(daemon):
    client = Client(daemon.handoff_socket)
    for _ in range(3):
        fd = sealed_memfd()
        reply = client.check_in(fd)
        os.close(fd)
        assert client.save_final(reply.id).code == 0
        got, fds = client.check_out()
        assert got.id == reply.id and len(fds) == 1
        framing.close_all(fds)
    client.close()


def test_slow_client_does_not_stall_another(make_daemon):
    daemon = make_daemon("[handoff]\ntimeout = 0.5\n")
    slow = Client(daemon.handoff_socket)
    slow.sock.sendall(b"\x10")  # the first byte of a header, then nothing

    fast = Client(daemon.handoff_socket)
    reply, _ = fast.check_out()
    assert reply.code == 0

    assert slow.recv() is None  # dropped after the per-frame timeout
    slow.close()
    fast.close()


def test_peer_of_another_uid_is_refused(daemon):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid")
    # The temporary directories are root's alone: the child reaches the
    # socket through a directory fd opened before it drops to uid 65534, and
    # keeps gid 0 so that the socket's mode (0660 root:root) lets it connect.
    run_dir = os.open(daemon.run_dir, os.O_PATH)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            os.close(r)
            os.setgroups([])
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(f"/proc/self/fd/{run_dir}/epm-handoff.sock")
            payload, _ = framing.recv_frame(sock, time.monotonic() + 5)
            code = hpb.HandoffReply.FromString(payload).code
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    os.close(run_dir)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == bytes([7])


def test_daemon_survives_and_returns_to_baseline(daemon):
    baseline = daemon.open_fds()
    for _ in range(5):
        client = Client(daemon.handoff_socket)
        client.send_raw(b"junk")
        client.recv()
        client.close()
    pool_one(daemon.handoff_socket)
    client = Client(daemon.handoff_socket)
    _, fds = client.check_out()
    framing.close_all(fds)
    client.close()

    assert daemon.proc.poll() is None
    assert wait_for_fds(daemon, baseline) == baseline


# Run in another process: check an enclave in, print its ID, exit unsaved.
CHECK_IN_CHILD = """
import fcntl, os, socket, sys, time
from epm_api import framing, handoff_pb2 as hpb, v1alpha1_pb2 as pb
fd = os.memfd_create("enclave", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 8192)
fcntl.fcntl(fd, 1033, 0x6)
ident = pb.EnclaveIdentity(mrenclave=b"\\x11" * 32, mrsigner=b"\\x22" * 32,
                           attributes=4, xfrm=3, size=8192, backend="sim")
enclave = pb.Enclave(nr=1, identity=ident, layout=[
    pb.Enclavelayout(addr=0x10000000, size=8192)])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
req = hpb.HandoffRequest(check_in=hpb.CheckIn(subtype="skeleton-0.0.0",
                                              enclave=enclave))
framing.send_frame(sock, req.SerializeToString(), time.monotonic() + 5, fd=fd)
payload, _ = framing.recv_frame(sock, time.monotonic() + 5)
print(hpb.HandoffReply.FromString(payload).id)
"""


def test_held_enclave_of_a_dead_owner_is_discarded(daemon):
    child = subprocess.run(
        [sys.executable, "-c", CHECK_IN_CHILD, str(daemon.handoff_socket)],
        capture_output=True, text=True, timeout=30, cwd=os.getcwd())
    assert child.returncode == 0, child.stderr
    entry_id = child.stdout.strip()

    # A save final would race the reaper and win: wait for its log event.
    deadline = time.monotonic() + 5
    while ("enclave_owner_died" not in daemon.log.read_text()
           and time.monotonic() < deadline):
        time.sleep(0.05)

    client = Client(daemon.handoff_socket)
    assert client.save_final(entry_id).code == 5
    client.close()


def test_check_out_pipelined_with_the_next_request_is_handed_out_once(daemon):
    """The next request may come before the reply was read: still one owner."""
    entry_id = pool_one(daemon.handoff_socket)
    client = Client(daemon.handoff_socket)
    check_out = hpb.HandoffRequest(check_out=hpb.CheckOut(
        subtype="skeleton-0.0.0", identity=identity()))
    client.send_raw(check_out.SerializeToString())
    client.send_raw(check_out.SerializeToString())
    time.sleep(0.1)

    first, fds = client.recv()
    second, more = client.recv()

    assert first.id == entry_id and len(fds) == 1
    assert second.code == 0 and not second.id and not more
    framing.close_all(fds)
    client.close()


def test_client_that_never_reads_its_replies_is_dropped(make_daemon):
    """Replies it leaves unread back up; past the timeout it is closed.

    The requests go in one large write, so that the daemon's small replies,
    not the client's requests, fill the socket's buffer.
    """
    daemon = make_daemon("[handoff]\ntimeout = 0.5\n")
    greedy = Client(daemon.handoff_socket)
    payload = hpb.HandoffRequest(
        save_final=hpb.SaveFinal(id="x" * 30)).SerializeToString()
    greedy.sock.sendall((framing.HEADER.pack(len(payload)) + payload) * 2000)

    other = Client(daemon.handoff_socket)
    assert other.check_out()[0].code == 0
    time.sleep(1.0)  # past the timeout, with replies still unread

    assert _drained_to_eof(greedy.sock, timeout=5)
    assert daemon.events("handoff_reply_failed")
    other.close()
    greedy.close()


def _drained_to_eof(sock, timeout):
    """Read and drop until EOF or a reset; False if ``timeout`` passes first."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def hold_request():
    return hpb.HandoffRequest(check_out=hpb.CheckOut(
        subtype="skeleton-0.0.0", identity=identity(), hold=True))


def entry_state(daemon, entry_id):
    """The entry's state as ListCache shows it, or None when it left."""
    from epm_client import Client as PoolClient
    with PoolClient(daemon.grpc_socket) as client:
        states = {e.id: e.state for e in client.list()}
    return states.get(entry_id)


def wait_for_state(daemon, entry_id, state, timeout=5):
    deadline = time.monotonic() + timeout
    while (entry_state(daemon, entry_id) != state
           and time.monotonic() < deadline):
        time.sleep(0.05)
    return entry_state(daemon, entry_id)


def test_check_out_with_hold_keeps_the_enclave_held_by_the_caller(daemon):
    entry_id = pool_one(daemon.handoff_socket)
    client = Client(daemon.handoff_socket)

    reply, fds = client.call(hold_request())
    assert reply.id == entry_id and len(fds) == 1
    assert os.pread(fds[0], len(CONTENT), 0) == CONTENT
    # The next request shows the reply was read: the hold is settled.
    assert client.check_out()[0].enclave.layout == []

    assert entry_state(daemon, entry_id) == "held"
    assert client.save_final(entry_id).code == 0
    assert entry_state(daemon, entry_id) == "available"
    framing.close_all(fds)
    client.close()


def test_save_final_with_discard_closes_a_held_enclave(daemon):
    entry_id = pool_one(daemon.handoff_socket)
    client = Client(daemon.handoff_socket)
    reply, fds = client.call(hold_request())
    framing.close_all(fds)

    discarded = client.call(hpb.HandoffRequest(
        save_final=hpb.SaveFinal(id=reply.id, discard=True)))[0]

    assert discarded.code == 0
    assert entry_state(daemon, entry_id) is None
    assert client.save_final(entry_id).code == 5
    client.close()


# Check out with hold, read the reply, and exit: the owner dies holding it.
HOLD_CHILD = """
import socket, sys, time
from epm_api import framing, handoff_pb2 as hpb, v1alpha1_pb2 as pb
ident = pb.EnclaveIdentity(mrenclave=b"\\x11" * 32, mrsigner=b"\\x22" * 32,
                           attributes=4, xfrm=3, size=8192, backend="sim")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
req = hpb.HandoffRequest(check_out=hpb.CheckOut(
    subtype="skeleton-0.0.0", identity=ident, hold=True))
framing.send_frame(sock, req.SerializeToString(), time.monotonic() + 5)
if sys.argv[2] == "read":
    payload, fds = framing.recv_frame(sock, time.monotonic() + 5)
    print(hpb.HandoffReply.FromString(payload).id, len(fds))
else:
    time.sleep(0.2)  # the reply and its fd wait, unread, in our socket
"""


def test_enclave_held_by_a_check_out_is_discarded_when_its_owner_dies(daemon):
    entry_id = pool_one(daemon.handoff_socket)

    child = subprocess.run(
        [sys.executable, "-c", HOLD_CHILD, str(daemon.handoff_socket), "read"],
        capture_output=True, text=True, timeout=30, cwd=os.getcwd())

    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == [entry_id, "1"]
    assert wait_for_state(daemon, entry_id, None) is None
    assert any(e["id"] == entry_id for e in daemon.events("enclave_owner_died"))


def test_held_check_out_that_the_client_never_read_goes_to_no_one_else(daemon):
    entry_id = pool_one(daemon.handoff_socket)

    child = subprocess.run(
        [sys.executable, "-c", HOLD_CHILD, str(daemon.handoff_socket), "unread"],
        capture_output=True, text=True, timeout=30, cwd=os.getcwd())

    assert child.returncode == 0, child.stderr
    assert wait_for_state(daemon, entry_id, None) is None
    assert any(e["id"] == entry_id for e in daemon.events("enclave_closed_unread"))
    client = Client(daemon.handoff_socket)
    reply, fds = client.check_out()
    assert reply.code == 0 and not reply.id and fds == []
    client.close()


def test_a_client_that_peeks_its_fd_and_closes_keeps_the_enclave_alone(daemon):
    """MSG_PEEK installs the fd and leaves the reply unread: closing then
    looks like dying before reading, yet the client holds the enclave."""
    entry_id = pool_one(daemon.handoff_socket)
    peeker = Client(daemon.handoff_socket)
    peeker.send_raw(hpb.HandoffRequest(check_out=hpb.CheckOut(
        subtype="skeleton-0.0.0", identity=identity())).SerializeToString())
    peeker.sock.settimeout(5)
    _, ancdata, _, _ = peeker.sock.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_PEEK)
    taken = array.array("i", ancdata[0][2])[0]
    peeker.close()

    assert wait_for_state(daemon, entry_id, None) is None
    client = Client(daemon.handoff_socket)
    reply, fds = client.check_out()
    assert reply.code == 0 and not reply.id and fds == []
    assert os.pread(taken, len(CONTENT), 0) == CONTENT
    os.close(taken)
    client.close()


# Hold, save final, then wait for stdin to close before exiting.
HOLD_AND_SAVE_CHILD = HOLD_CHILD + """
req = hpb.HandoffRequest(save_final=hpb.SaveFinal(id=payload and
                         hpb.HandoffReply.FromString(payload).id))
framing.send_frame(sock, req.SerializeToString(), time.monotonic() + 5)
print(hpb.HandoffReply.FromString(
    framing.recv_frame(sock, time.monotonic() + 5)[0]).code, flush=True)
sys.stdin.read()
"""


def test_a_former_holders_death_spares_the_next_holder(daemon):
    """The entry keeps its ID from one holder to the next; the reaper's
    watch on the first must not discard it from the second."""
    entry_id = pool_one(daemon.handoff_socket)
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_SAVE_CHILD, str(daemon.handoff_socket),
         "read"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=os.getcwd())
    assert first.stdout.readline().split() == [entry_id, "1"]
    assert first.stdout.readline().strip() == "0"

    client = Client(daemon.handoff_socket)
    reply, fds = client.call(hold_request())
    assert reply.id == entry_id
    client.check_out()  # settles the hold
    first.communicate(timeout=10)
    time.sleep(1.5)  # three of the reaper's ticks

    assert entry_state(daemon, entry_id) == "held"
    assert client.save_final(entry_id).code == 0
    framing.close_all(fds)
    client.close()


def check_in_available(client, fd):
    reply, _ = client.call(hpb.HandoffRequest(check_in=hpb.CheckIn(
        subtype="skeleton-0.0.0", enclave=enclave(), available=True)), fd=fd)
    return reply


def test_check_in_with_available_is_checked_out_at_once(daemon):
    client = Client(daemon.handoff_socket)
    fd = sealed_memfd()

    checked_in = check_in_available(client, fd)
    os.close(fd)
    reply, fds = client.check_out()

    assert checked_in.code == 0 and checked_in.id
    assert reply.id == checked_in.id and len(fds) == 1
    assert os.pread(fds[0], len(CONTENT), 0) == CONTENT
    framing.close_all(fds)
    client.close()


def test_check_in_with_available_outlives_its_owner(daemon):
    """Nothing is held, so the owner's death discards nothing."""
    child = subprocess.run(
        [sys.executable, "-c", CHECK_IN_CHILD.replace(
            "enclave=enclave))", "enclave=enclave, available=True))"),
         str(daemon.handoff_socket)],
        capture_output=True, text=True, timeout=30, cwd=os.getcwd())
    assert child.returncode == 0, child.stderr
    entry_id = child.stdout.strip()

    time.sleep(1.0)  # two of the reaper's ticks

    assert entry_state(daemon, entry_id) == "available"


def test_the_same_check_in_bytes_still_check_each_fd(daemon):
    """Validated requests are kept by their bytes; their fds never are."""
    client = Client(daemon.handoff_socket)
    good, pipe = sealed_memfd(), _pipe()

    first = client.check_in(good)
    second = client.check_in(pipe)
    third = client.check_in(good)
    none, _ = client.call(hpb.HandoffRequest(check_in=hpb.CheckIn(
        subtype="skeleton-0.0.0", enclave=enclave())))

    os.close(good)
    os.close(pipe)
    assert first.code == 0
    assert second.code == 3 and "pipe" in second.message
    assert third.code == 6 and "same open file" in third.message
    assert none.code == 3 and "got 0" in none.message
    client.close()


def test_error_replies_quote_what_the_client_sent(daemon, tmp_path):
    """A reply is one printable line: a client's ID or file name is quoted
    with its control characters escaped, and cut when long."""
    client = Client(daemon.handoff_socket)
    bad_id = client.save_final("\x1b[31m\n../x")
    long_id = client.save_final("\x07" * 1000)
    path = tmp_path / "\x1b[2J\nname"
    path.write_bytes(b"\0" * SIZE)
    fd = os.open(path, os.O_RDONLY)
    bad_file = client.check_in(fd)
    os.close(fd)
    client.close()

    assert bad_id.code == 3
    assert "save_final.id: '\\x1b[31m\\n../x'" in bad_id.message
    assert long_id.code == 3 and len(long_id.message) < 600
    assert bad_file.code == 3 and "\\x1b[2J\\nname" in bad_file.message
    for reply in (bad_id, long_id, bad_file):
        assert reply.message.isprintable(), reply.message


def test_a_check_out_checked_in_again_on_another_connection_is_taken(daemon):
    """The check-out settles when its connection's next request comes; a
    check-in of the same enclave on another connection before then settles
    it too, instead of being refused as the pool's own enclave."""
    pool_one(daemon.handoff_socket)
    getter, giver = Client(daemon.handoff_socket), Client(daemon.handoff_socket)
    replies = []
    for _ in range(5):
        got, fds = getter.check_out()
        assert got.code == 0 and len(fds) == 1, got.message
        reply = giver.call(hpb.HandoffRequest(check_in=hpb.CheckIn(
            subtype="skeleton-0.0.0", enclave=enclave(), available=True)),
            fd=fds[0])[0]
        os.close(fds[0])
        replies.append((reply.code, reply.message))
    getter.close()
    giver.close()

    assert replies == [(0, "")] * 5
