"""Hostile input: generated RPCs, broken frames, wrong fds, connection floods.

Each is refused with a clear status or a closed connection; the daemon stays
up and its descriptor count returns to where it was.
"""

import os
import select
import socket
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epm_api import framing
from epm_api import handoff_pb2 as hpb
from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc
from test_handoff import Client, enclave, pool_one, sealed_memfd, wait_for_fds

CONFIG = ("max_recv_message_size = 65536\n"
          "[legacy]\naccept_timeout = 0.5\n"
          "[handoff]\ntimeout = 0.5\n")
EXAMPLES = int(os.environ.get("EPM_HOSTILE_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# What a refusal may be; UNKNOWN or INTERNAL would mean an unhandled error.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.PERMISSION_DENIED}
TYPES = ["enclave-cache-pool", "bundle-cache.occlum.cache0",
         "bundle-cache.occlum.cache2", "", "no-such-pool"]
U64 = st.one_of(st.sampled_from([0, 1, 4096, 2 ** 63, 2 ** 64 - 4096,
                                 2 ** 64 - 1]), st.integers(0, 2 ** 64 - 1))
I64 = st.one_of(st.sampled_from([0, -1, 1, -2 ** 63, 2 ** 63 - 1]),
                st.integers(-2 ** 63, 2 ** 63 - 1))
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(
    ["skeleton-0.0.0", "../../etc/passwd", "a/b", "\x00", "x" * 5000, ".", ""]))


@st.composite
def layouts(draw):
    return [pb.Enclavelayout(addr=draw(U64), size=draw(U64), prot=pb.EnclavePerms(
        read=draw(st.booleans()), write=draw(st.booleans()),
        share=draw(st.booleans()), private=draw(st.booleans())))
        for _ in range(draw(st.integers(0, 70)))]


@st.composite
def identities(draw):
    return pb.EnclaveIdentity(
        mrenclave=draw(st.binary(max_size=40)), mrsigner=draw(st.binary(max_size=40)),
        attributes=draw(U64), xfrm=draw(U64), size=draw(U64),
        backend=draw(st.sampled_from(["sim", "sgx", "", "kvm"])))


@st.composite
def enclaves(draw):
    msg = pb.Enclave(fd=draw(I64), nr=draw(I64), layout=draw(layouts()))
    if draw(st.booleans()):
        msg.identity.CopyFrom(draw(identities()))
    return msg


@st.composite
def options(draw):
    url = draw(st.sampled_from([
        "type.googleapis.com/v1alpha1.Enclave", "type.googleapis.com/v1alpha1.Cache",
        "type.googleapis.com/google.protobuf.Empty", "", "garbage/x.y"]))
    value = draw(st.one_of(enclaves().map(lambda e: e.SerializeToString()),
                           st.binary(max_size=64)))
    from google.protobuf import any_pb2
    return any_pb2.Any(type_url=url, value=value)


@st.composite
def caches(draw, depth=1):
    cache = pb.Cache(type=draw(st.sampled_from(TYPES)), subType=draw(TEXT),
                     ID=draw(TEXT), savePath=draw(TEXT), size=draw(I64),
                     created=draw(I64))
    if draw(st.booleans()):
        cache.options.CopyFrom(draw(options()))
    if depth and draw(st.booleans()):
        cache.parent.CopyFrom(draw(caches(depth=0)))
    return cache


def requests():
    t = st.sampled_from(TYPES)
    save = st.builds(pb.SaveCacheRequest, cache=caches(), sourcePath=TEXT)
    return st.one_of(
        st.tuples(st.just("GetCache"), st.builds(pb.GetCacheRequest, type=t,
                                                  subType=TEXT, ID=TEXT)),
        st.tuples(st.just("PickCache"), st.builds(
            pb.PickCacheRequest, type=t, subType=TEXT,
            filters=st.dictionaries(TEXT, TEXT, max_size=3))),
        st.tuples(st.just("SaveCache"), save),
        st.tuples(st.just("SaveFinalCache"), save),
        st.tuples(st.just("ListCache"), st.builds(
            pb.ListCacheRequest, type=t, subType=TEXT, lastCacheID=TEXT,
            limit=st.integers(-2 ** 31, 2 ** 31 - 1))),
        st.tuples(st.just("DeleteCache"), st.builds(
            pb.DeleteCacheRequest, type=t, subType=TEXT, ID=TEXT)),
        st.tuples(st.just("LoadCache"), st.builds(
            pb.LoadCacheRequest, type=t, subType=TEXT, ID=TEXT, targetPath=TEXT)),
        st.tuples(st.just("Healthz"), st.builds(pb.HealthzRequest, type=t)))


@pytest.fixture
def hostile(make_daemon):
    daemon = make_daemon(CONFIG)
    channel = grpc.insecure_channel(f"unix:{daemon.grpc_socket}")
    stub = pb_grpc.EnclavePoolManagerStub(channel)
    stub.Healthz(pb.HealthzRequest())
    daemon.baseline = daemon.open_fds()
    yield daemon, stub
    channel.close()


def settle(daemon):
    """Pending legacy check-ins expire after accept_timeout; then count."""
    assert daemon.proc.poll() is None
    assert wait_for_fds(daemon, daemon.baseline, timeout=10) == daemon.baseline


def test_generated_rpcs_are_answered_or_refused_cleanly(hostile):
    daemon, stub = hostile
    # A pooled enclave, so that GetCache has something to try to hand out.
    pool_one(daemon.handoff_socket)
    daemon.baseline += 1

    @FUZZ
    @given(requests())
    def call(method_and_request):
        method, request = method_and_request
        try:
            getattr(stub, method)(request, timeout=10)
        except grpc.RpcError as e:
            assert e.code() in REFUSALS, (method, e.code(), e.details())
            assert e.details(), (method, e.code())

    call()
    assert stub.Healthz(pb.HealthzRequest(), timeout=5).ok
    # Generated DeleteCache calls cannot guess the pooled enclave's ID.
    settle(daemon)


def test_message_over_the_size_limit_is_resource_exhausted(hostile):
    daemon, stub = hostile
    request = pb.GetCacheRequest(type="enclave-cache-pool", ID="x" * 70000)

    with pytest.raises(grpc.RpcError) as info:
        stub.GetCache(request, timeout=5)

    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    settle(daemon)


def test_generated_hand_off_frames_are_answered_or_closed(hostile):
    daemon, _ = hostile
    request = st.one_of(
        st.binary(max_size=300),
        st.builds(lambda s, i: hpb.HandoffRequest(check_out=hpb.CheckOut(
            subtype=s, identity=i)).SerializeToString(), TEXT, identities()),
        st.builds(lambda s, e: hpb.HandoffRequest(check_in=hpb.CheckIn(
            subtype=s, enclave=e)).SerializeToString(), TEXT, enclaves()),
        st.builds(lambda i: hpb.HandoffRequest(save_final=hpb.SaveFinal(
            id=i)).SerializeToString(), TEXT))

    @FUZZ
    @given(request, st.booleans())
    def send(payload, with_fd):
        client = Client(daemon.handoff_socket)
        fd = sealed_memfd() if with_fd else None
        try:
            client.send_raw(payload, fd=fd)
            got = client.recv()
        finally:
            if fd is not None:
                os.close(fd)
        if got is not None:
            reply, fds = got
            framing.close_all(fds)
            assert reply.code in (0, 3, 5, 8, 9), reply
        client.close()

    send()
    settle(daemon)



def _wrong_fds():
    r, w = os.pipe()
    os.close(w)
    yield "pipe", r
    yield "socket", socket.socket(socket.AF_UNIX).detach()
    yield "directory", os.open("/", os.O_RDONLY)
    yield "regular file", os.open(__file__, os.O_RDONLY)
    yield "/dev/null", os.open("/dev/null", os.O_RDWR)
    ep = select.epoll()
    yield "eventpoll", os.dup(ep.fileno())
    ep.close()


def test_wrong_fd_kinds_are_refused_by_name(hostile):
    daemon, _ = hostile
    client = Client(daemon.handoff_socket)
    client.check_out()
    for what, fd in _wrong_fds():
        reply = client.check_in(fd)
        os.close(fd)
        assert reply.code == 3 and what in reply.message, (what, reply.message)
    client.close()
    settle(daemon)


def test_fd_on_a_check_out_or_save_final_is_refused_and_closed(hostile):
    daemon, _ = hostile
    client = Client(daemon.handoff_socket)
    fd = sealed_memfd()
    for request in (hpb.HandoffRequest(check_out=hpb.CheckOut(subtype="s")),
                    hpb.HandoffRequest(save_final=hpb.SaveFinal(id="x"))):
        reply, fds = client.call(request, fd=fd)
        assert reply.code == 3 and not fds, reply
    os.close(fd)
    client.close()
    settle(daemon)


@pytest.mark.parametrize("partial", [
    b"\x10", framing.HEADER.pack(100), framing.HEADER.pack(100) + b"\x0a\x05"])
def test_partial_frame_left_open_is_dropped_and_others_are_served(
        hostile, partial):
    daemon, _ = hostile
    slow = Client(daemon.handoff_socket)
    fd = sealed_memfd()
    slow.sock.sendmsg([partial], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   fd.to_bytes(4, "little"))])
    os.close(fd)

    other = Client(daemon.handoff_socket)
    assert other.check_out()[0].code == 0
    started = time.monotonic()
    assert slow.recv() is None
    assert time.monotonic() - started < 3

    slow.close()
    other.close()
    settle(daemon)


def test_connection_flood_is_bounded_and_leaves_nothing(hostile):
    """One uid holds at most its share (16): its newest evict its idlest."""
    daemon, _ = hostile
    flood = []
    try:
        for _ in range(150):
            flood.append(Client(daemon.handoff_socket))
        closed = sum(1 for client in flood[:150 - 16] if client.recv() is None)
        assert closed == 150 - 16
        assert daemon.open_fds() <= daemon.baseline + 16 + 4
    finally:
        for client in flood:
            client.close()
    client = Client(daemon.handoff_socket)
    assert client.check_out()[0].code == 0
    client.close()
    settle(daemon)


def test_check_in_with_a_mismatched_nr_is_refused(hostile):
    daemon, _ = hostile
    client = Client(daemon.handoff_socket)
    enc = enclave()
    enc.nr = 5
    fd = sealed_memfd()
    reply = client.check_in(fd, enc=enc)
    os.close(fd)
    assert reply.code == 3 and "nr" in reply.message
    client.close()
    settle(daemon)
