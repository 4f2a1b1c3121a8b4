"""The gRPC service over a Unix socket, published clients' hand-off included."""

import array
import mmap
import os
import re
import socket
import time

import grpc
import pytest

from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc
from test_handoff import CONTENT, Client, enclave, identity, pool_one, sealed_memfd
from live_daemon import Daemon

POOL = "enclave-cache-pool"
SUBTYPE = "skeleton-0.0.0"


@pytest.fixture
def stub(daemon):
    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}") as channel:
        yield pb_grpc.EnclavePoolManagerStub(channel)


def listed(stub, **kwargs):
    caches = stub.ListCache(pb.ListCacheRequest(type=POOL, **kwargs)).caches
    result = []
    for cache in caches:
        enc = pb.Enclave()
        assert cache.options.Unpack(enc)
        result.append((cache, enc))
    return result


def wait_until(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def wait_for_state(stub, cache_id, state, timeout=5):
    return wait_until(
        lambda: {c.ID: e.state for c, e in listed(stub)}.get(cache_id) == state,
        timeout)


def code_of(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), info.value.details()


def test_healthz(stub):
    assert stub.Healthz(pb.HealthzRequest(type=POOL)).ok
    assert stub.Healthz(pb.HealthzRequest()).ok


def test_list_cache_shows_entries_with_state_and_identity(daemon, stub):
    ids = sorted(pool_one(daemon.handoff_socket) for _ in range(3))

    entries = listed(stub)
    page = listed(stub, lastCacheID=ids[0], limit=1)

    assert [c.ID for c, _ in entries] == ids
    cache, enc = entries[0]
    assert (cache.type, cache.subType, cache.size) == (POOL, SUBTYPE, 8192)
    assert abs(cache.created - time.time()) < 60
    assert (enc.fd, enc.nr, enc.state) == (-1, 1, "available")
    assert enc.identity == identity() and enc.layout == enclave().layout
    assert [c.ID for c, _ in page] == [ids[1]]
    assert listed(stub, subType="other") == []


def test_delete_cache(daemon, stub):
    available = pool_one(daemon.handoff_socket)
    client = Client(daemon.handoff_socket)
    fd = sealed_memfd()
    held = client.check_in(fd).id
    os.close(fd)

    def delete(cache_id):
        return stub.DeleteCache(pb.DeleteCacheRequest(type=POOL, ID=cache_id))

    assert delete(available).ok
    assert code_of(delete, available)[0] == grpc.StatusCode.NOT_FOUND
    code, details = code_of(delete, held)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "held" in details
    assert [c.ID for c, _ in listed(stub)] == [held]
    client.close()


def test_pick_cache_filters(daemon, stub):
    pool_one(daemon.handoff_socket)
    mrenclave = identity().mrenclave.hex()

    def pick(**filters):
        return stub.PickCache(pb.PickCacheRequest(
            type=POOL, subType=SUBTYPE, filters=filters)).caches

    assert len(pick(mrenclave=mrenclave)) == 1
    assert len(pick(mrenclave="00" * 32)) == 0
    code, details = code_of(stub.PickCache, pb.PickCacheRequest(
        type=POOL, filters={"colour": "x"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "colour" in details


METHODS = [
    ("GetCache", lambda t: pb.GetCacheRequest(type=t, subType=SUBTYPE, ID="a")),
    ("PickCache", lambda t: pb.PickCacheRequest(type=t)),
    ("SaveCache", lambda t: pb.SaveCacheRequest(cache=pb.Cache(type=t, ID="a"))),
    ("SaveFinalCache", lambda t: pb.SaveCacheRequest(cache=pb.Cache(type=t))),
    ("ListCache", lambda t: pb.ListCacheRequest(type=t)),
    ("DeleteCache", lambda t: pb.DeleteCacheRequest(type=t, ID="a")),
    ("LoadCache", lambda t: pb.LoadCacheRequest(type=t)),
    ("Healthz", lambda t: pb.HealthzRequest(type=t)),
]


@pytest.mark.parametrize("method, request_for", METHODS)
def test_unknown_pool_type_is_invalid(stub, method, request_for):
    code, details = code_of(getattr(stub, method), request_for("no-such-pool"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no-such-pool" in details


def test_load_cache_does_not_apply(stub):
    code, _ = code_of(stub.LoadCache, pb.LoadCacheRequest(type=POOL, ID="a"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("bad_id", ["", "../etc", "a/b", "x" * 65, "sp ace"])
def test_bad_legacy_id_is_invalid(stub, bad_id):
    code, details = code_of(stub.SaveCache, legacy_save_request(bad_id))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("ID:")
    code, _ = code_of(stub.GetCache, pb.GetCacheRequest(
        type=POOL, subType=SUBTYPE, ID=bad_id))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def legacy_save_request(cache_id, with_identity=False):
    enc = enclave()
    if not with_identity:
        enc.ClearField("identity")
    cache = pb.Cache(type=POOL, subType=SUBTYPE, ID=cache_id)
    cache.options.Pack(enc)
    return pb.SaveCacheRequest(cache=cache)


def send_fd(path, fd):
    """What a published client does at check-in: connect, send \\0 and the fd."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [fd]).tobytes())])


def legacy_check_in(daemon, stub, cache_id, with_identity=False):
    assert stub.SaveCache(legacy_save_request(cache_id, with_identity)).ok
    fd = sealed_memfd()
    send_fd(daemon.run_dir / cache_id, fd)
    os.close(fd)
    assert wait_for_state(stub, cache_id, "held")
    assert not (daemon.run_dir / cache_id).exists()


@pytest.mark.parametrize("with_identity", [False, True])
def test_legacy_check_in_save_final_and_get_cache(daemon, stub, with_identity):
    legacy_check_in(daemon, stub, "ci-1", with_identity)
    code, details = code_of(stub.SaveCache, legacy_save_request("ci-1"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert stub.SaveFinalCache(pb.SaveCacheRequest(
        cache=pb.Cache(type=POOL, subType=SUBTYPE, ID="ci-1"))).ok
    assert wait_for_state(stub, "ci-1", "available")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(daemon.run_dir / "co-1"))
    listener.listen(1)

    response = stub.GetCache(pb.GetCacheRequest(type=POOL, subType=SUBTYPE,
                                                ID="co-1"))

    conn, _ = listener.accept()
    data, ancdata, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(8))
    fds = array.array("i", ancdata[0][2])
    os.unlink(daemon.run_dir / "co-1")
    conn.close()
    listener.close()
    enc = pb.Enclave()
    assert response.cache.options.Unpack(enc)
    assert response.cache.ID == "ci-1" and enc.layout == enclave().layout
    assert data == b"\0" and len(fds) == 1
    with mmap.mmap(fds[0], 8192, mmap.MAP_SHARED, mmap.PROT_READ) as mem:
        assert mem[:len(CONTENT)] == CONTENT
    os.close(fds[0])
    assert listed(stub) == []


def test_get_cache_on_empty_pool_has_no_cache(stub):
    response = stub.GetCache(pb.GetCacheRequest(type=POOL, subType=SUBTYPE,
                                                ID="nobody"))
    assert not response.HasField("cache")


def test_get_cache_without_listener_is_unavailable_and_keeps_enclave(daemon, stub):
    entry_id = pool_one(daemon.handoff_socket)

    code, _ = code_of(stub.GetCache, pb.GetCacheRequest(
        type=POOL, subType=SUBTYPE, ID="absent"))

    assert code == grpc.StatusCode.UNAVAILABLE
    assert wait_for_state(stub, entry_id, "available")


def test_legacy_refuses_a_pipe(daemon, stub):
    assert stub.SaveCache(legacy_save_request("pipe-1")).ok
    r, w = os.pipe()
    send_fd(daemon.run_dir / "pipe-1", r)
    os.close(r)
    os.close(w)
    deadline = time.monotonic() + 5
    while listed(stub) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listed(stub) == []
    assert not (daemon.run_dir / "pipe-1").exists()


def test_save_final_of_pending_names_the_state(daemon, stub):
    assert stub.SaveCache(legacy_save_request("pend-1")).ok
    code, details = code_of(stub.SaveFinalCache, pb.SaveCacheRequest(
        cache=pb.Cache(type=POOL, subType=SUBTYPE, ID="pend-1")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "pending" in details


def test_stop_while_waiting_for_a_check_in_leaves_no_socket(daemon, stub):
    assert stub.SaveCache(legacy_save_request("waiting")).ok
    assert (daemon.run_dir / "waiting").exists()

    assert daemon.stop() == 0

    assert list(daemon.run_dir.iterdir()) == []


ENCLAVE_URL = "type.googleapis.com/v1alpha1.Enclave"


def test_corrupt_enclave_in_options_is_invalid_and_names_the_type(stub):
    """A packed Enclave that does not parse is the client's error, not ours."""
    cache = pb.Cache(type=POOL, subType=SUBTYPE, ID="bad-options")
    cache.options.type_url = ENCLAVE_URL
    cache.options.value = b"\xff\xff\xff"

    code, details = code_of(stub.SaveCache, pb.SaveCacheRequest(cache=cache))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("options:") and "v1alpha1.Enclave" in details
    assert listed(stub) == []


@pytest.fixture
def bundle_stub(make_daemon, tmp_path):
    """A stub on a daemon whose bundle caches may read from ``tmp_path/src``."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "file").write_text("cache data")
    daemon = make_daemon(f'[bundle]\nallowed_roots = ["{tmp_path}"]\n'
                         "[legacy]\naccept_timeout = 0.5\n")
    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}") as channel:
        yield daemon, pb_grpc.EnclavePoolManagerStub(channel), tmp_path / "src"


def test_malformed_options_are_refused_or_ignored_by_every_method(bundle_stub):
    """Every method that takes a Cache, on every pool type, with generated
    ``options``: an answer, or a refusal naming a field; never UNKNOWN or
    INTERNAL, and the daemon logs no unexpected error."""
    from google.protobuf import any_pb2
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    daemon, stub, source = bundle_stub
    urls = st.sampled_from([ENCLAVE_URL, "type.googleapis.com/v1alpha1.Cache",
                            "type.googleapis.com/v1alpha1.Enclavelayout",
                            "type.googleapis.com/google.protobuf.Empty",
                            "", "x", "/v1alpha1.Enclave"])
    values = st.one_of(st.binary(max_size=48), st.sampled_from(
        [b"\xff\xff\xff", b"\x08", b"\x1a\x05\x08", b"\x1a\xff\xff\xff\xff\x0f"]))
    types = st.sampled_from([POOL, "bundle-cache.occlum.cache0"])
    methods = st.sampled_from(["SaveCache", "SaveFinalCache"])
    seen = set()

    @settings(max_examples=80, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(methods, types, urls, values)
    def call(method, pool_type, url, value):
        cache_id = f"o{len(seen)}"
        seen.add(cache_id)
        cache = pb.Cache(type=pool_type, subType=SUBTYPE, ID=cache_id,
                         options=any_pb2.Any(type_url=url, value=value))
        request = pb.SaveCacheRequest(cache=cache, sourcePath=str(source))
        try:
            getattr(stub, method)(request, timeout=10)
        except grpc.RpcError as e:
            assert e.code() not in (grpc.StatusCode.UNKNOWN,
                                    grpc.StatusCode.INTERNAL), e.details()
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                assert re.match(r"[A-Za-z.]+: ", e.details()), e.details()

    call()
    assert daemon.events("rpc_failed") == []


def test_an_unexpected_error_is_internal_and_logged_once():
    import structlog

    from epm_server.service import adapt

    class Context:
        def abort(self, code, details):
            self.status = (code, details)
            raise RuntimeError("aborted")

    @adapt
    def SaveCache(self, request, context):
        raise KeyError("a bug of ours")

    context = Context()
    with structlog.testing.capture_logs() as logs, pytest.raises(RuntimeError):
        SaveCache(None, None, context)

    assert context.status[0] == grpc.StatusCode.INTERNAL
    assert context.status[1].startswith("SaveCache: internal error (KeyError)")
    assert [e["event"] for e in logs] == ["rpc_failed"]


def raw_connections(path, count):
    """``count`` connections that never speak HTTP/2."""
    conns = []
    for _ in range(count):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(path))
        conns.append(conn)
    return conns


def wait_for_fds_at_most(daemon, limit, timeout=5):
    deadline = time.monotonic() + timeout
    while daemon.open_fds() > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon.open_fds()


def test_idle_connections_on_the_grpc_socket_are_bounded(daemon, stub):
    """The tester's flood: idle connections past the limit are closed as they
    are accepted, so they cost the daemon no descriptor."""
    from epm_server.service import MAX_CONNECTIONS

    baseline = daemon.open_fds()
    conns = raw_connections(daemon.grpc_socket, MAX_CONNECTIONS + 300)
    try:
        time.sleep(0.5)
        assert daemon.open_fds() <= baseline + MAX_CONNECTIONS + 8
    finally:
        for conn in conns:
            conn.close()

    assert wait_for_fds_at_most(daemon, baseline + 8) <= baseline + 8
    assert stub.Healthz(pb.HealthzRequest(), timeout=5).ok


def test_a_connection_that_never_handshakes_gives_its_slot_back(tmp_path):
    from epm_server.service import EnclavePoolService, serve

    path = tmp_path / "grpc.sock"
    server = serve(EnclavePoolService(None, None, None), str(path), 1 << 16,
                   1 << 16, max_connections=4, handshake_timeout=0.5)
    conns = raw_connections(path, 4)
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            start = time.monotonic()
            reply = pb_grpc.EnclavePoolManagerStub(channel).Healthz(
                pb.HealthzRequest(), timeout=10, wait_for_ready=True)

        assert reply.ok and time.monotonic() - start >= 0.3
    finally:
        for conn in conns:
            conn.close()
        server.stop(0).wait()


def test_grpc_connection_limit_and_handshake_timeout_come_from_the_config(tmp_path):
    d = Daemon(tmp_path)
    with d.config.open("a") as f:  # [grpc] is the config's last table
        f.write("max_connections = 4\nhandshake_timeout = 0.5\n")
    d.start()
    try:
        baseline = d.open_fds()
        conns = raw_connections(d.grpc_socket, 40)
        try:
            time.sleep(0.3)
            assert d.open_fds() <= baseline + 4 + 4
            with grpc.insecure_channel(f"unix:{d.grpc_socket}") as channel:
                reply = pb_grpc.EnclavePoolManagerStub(channel).Healthz(
                    pb.HealthzRequest(), timeout=10, wait_for_ready=True)
            assert reply.ok
        finally:
            for conn in conns:
                conn.close()
    finally:
        d.stop()
