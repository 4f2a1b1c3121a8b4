"""Bundle caches over gRPC: save, get, list, pick, load, delete, parent chains."""

import concurrent.futures
import os

import grpc
import pytest

from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc
from test_service import code_of

T0, T1, T2 = (f"bundle-cache.occlum.cache{i}" for i in range(3))
SUBTYPE = "occlum"


class Bundles:
    """A daemon with ``tmp/bundles`` as its allowed root, and a stub."""

    def __init__(self, daemon, allowed):
        self.daemon = daemon
        self.allowed = allowed
        self.root = daemon.dir / "root"
        self.channel = grpc.insecure_channel(f"unix:{daemon.grpc_socket}")
        self.stub = pb_grpc.EnclavePoolManagerStub(self.channel)

    def tree(self, name, files):
        """Make a source tree under the allowed root; return its path."""
        base = self.allowed / name
        for rel, content in files.items():
            path = base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        return base

    def save(self, pool_type, cache_id, source, parent=None, subtype=SUBTYPE):
        cache = pb.Cache(type=pool_type, subType=subtype, ID=cache_id)
        if parent is not None:
            cache.parent.CopyFrom(pb.Cache(type=parent[0], ID=parent[1]))
        return self.stub.SaveCache(pb.SaveCacheRequest(cache=cache,
                                                       sourcePath=str(source)))

    def get(self, pool_type, cache_id, subtype=""):
        return self.stub.GetCache(pb.GetCacheRequest(
            type=pool_type, subType=subtype, ID=cache_id)).cache

    def list(self, pool_type, after="", limit=0, subtype=""):
        return [c.ID for c in self.stub.ListCache(pb.ListCacheRequest(
            type=pool_type, subType=subtype, lastCacheID=after,
            limit=limit)).caches]

    def load(self, pool_type, cache_id, target):
        return self.stub.LoadCache(pb.LoadCacheRequest(
            type=pool_type, ID=cache_id, targetPath=str(target)))

    def delete(self, pool_type, cache_id):
        return self.stub.DeleteCache(pb.DeleteCacheRequest(type=pool_type,
                                                           ID=cache_id))


@pytest.fixture
def bundles(make_daemon, tmp_path):
    allowed = tmp_path / "bundles"
    allowed.mkdir()
    daemon = make_daemon(f'[bundle]\nallowed_roots = ["{allowed}"]\n')
    b = Bundles(daemon, allowed)
    yield b
    b.channel.close()


def read_tree(path):
    return {str(p.relative_to(path)): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


FILES = {"bin/app": b"\x7fELF app", "etc/conf": b"k=v\n", "empty": b""}


def test_save_get_and_load_round_trip(bundles):
    source = bundles.tree("src", FILES)

    assert bundles.save(T0, "base", source).ok
    cache = bundles.get(T0, "base")
    assert bundles.load(T0, "base", bundles.allowed / "out").ok

    assert (cache.type, cache.subType, cache.ID) == (T0, SUBTYPE, "base")
    assert cache.size == sum(len(v) for v in FILES.values())
    assert cache.created > 0 and not cache.HasField("parent")
    assert cache.savePath == str(bundles.root / T0 / "base" / "data")
    assert read_tree(bundles.allowed / "out") == FILES


def test_a_single_file_round_trips(bundles):
    source = bundles.tree("one", {"f": b"single"}) / "f"

    assert bundles.save(T0, "file", source).ok
    assert bundles.load(T0, "file", bundles.allowed / "copy").ok

    assert (bundles.allowed / "copy").read_bytes() == b"single"


def test_parent_chain_nests_and_is_reported(bundles):
    bundles.save(T0, "c0", bundles.tree("s0", {"a": b"0"}))
    bundles.save(T1, "c1", bundles.tree("s1", {"b": b"1"}), parent=(T0, "c0"))
    bundles.save(T2, "c2", bundles.tree("s2", {"c": b"2"}), parent=(T1, "c1"))

    cache = bundles.get(T2, "c2")

    assert cache.savePath == str(bundles.root / T0 / "c0" / T1 / "c1" / T2 / "c2"
                                 / "data")
    assert (cache.parent.type, cache.parent.ID) == (T1, "c1")
    assert (cache.parent.parent.type, cache.parent.parent.ID) == (T0, "c0")
    assert bundles.load(T2, "c2", bundles.allowed / "o2").ok
    assert read_tree(bundles.allowed / "o2") == {"c": b"2"}


def test_missing_parent_is_not_found(bundles):
    code, details = code_of(lambda r: bundles.stub.SaveCache(r), pb.SaveCacheRequest(
        cache=pb.Cache(type=T1, subType=SUBTYPE, ID="orphan",
                       parent=pb.Cache(type=T0, ID="absent")),
        sourcePath=str(bundles.tree("s", {"a": b""}))))
    assert code == grpc.StatusCode.NOT_FOUND and "absent" in details


def test_delete_removes_own_data_and_refuses_a_parent(bundles):
    bundles.save(T0, "p", bundles.tree("s0", {"a": b"0"}))
    bundles.save(T1, "k", bundles.tree("s1", {"b": b"1"}), parent=(T0, "p"))

    code, details = code_of(lambda _: bundles.delete(T0, "p"), None)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "k" in details

    assert bundles.delete(T1, "k").ok
    assert not (bundles.root / T0 / "p" / T1 / "k").exists()
    assert bundles.delete(T0, "p").ok
    assert not (bundles.root / T0 / "p").exists()
    for call in (lambda _: bundles.get(T0, "p"), lambda _: bundles.delete(T0, "p")):
        assert code_of(call, None)[0] == grpc.StatusCode.NOT_FOUND


def test_list_pages_in_id_order_and_limit_0_means_all(bundles):
    source = bundles.tree("s", {"a": b"x"})
    ids = [f"id-{i:02d}" for i in range(7)]
    for cache_id in reversed(ids):
        bundles.save(T0, cache_id, source)
    bundles.save(T0, "other", source, subtype="other-sub")

    pages, after = [], ""
    for _ in range(10):
        page = bundles.list(T0, after=after, limit=3, subtype=SUBTYPE)
        if not page:
            break
        pages.append(page)
        after = page[-1]

    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    assert bundles.list(T0, limit=0) == ids + ["other"]
    assert bundles.list(T1) == []
    code, _ = code_of(lambda _: bundles.list(T0, limit=-1), None)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_pick_filters_on_record_fields(bundles):
    bundles.save(T0, "p0", bundles.tree("s0", {"a": b"12345"}))
    bundles.save(T1, "p1", bundles.tree("s1", {"a": b"1"}), parent=(T0, "p0"))

    def pick(pool_type, **filters):
        return [c.ID for c in bundles.stub.PickCache(pb.PickCacheRequest(
            type=pool_type, filters=filters)).caches]

    assert pick(T0, size="5") == ["p0"]
    assert pick(T0, size="6") == []
    assert pick(T1, parentID="p0", subType=SUBTYPE) == ["p1"]
    code, details = code_of(lambda _: pick(T0, colour="red"), None)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "colour" in details


def test_two_saves_of_one_id_at_once(bundles):
    source = bundles.tree("big", {f"f{i}": b"x" * 4096 for i in range(200)})

    def save(_):
        try:
            return bundles.save(T0, "same", source).ok
        except grpc.RpcError as e:
            return e.code()

    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        results = list(executor.map(save, range(4)))

    assert results.count(True) == 1
    assert set(results) - {True} == {grpc.StatusCode.ALREADY_EXISTS}
    assert bundles.list(T0) == ["same"]
    assert os.listdir(bundles.root / ".tmp") == []


@pytest.mark.parametrize("method, request_", [
    ("GetCache", pb.GetCacheRequest(type=T0, ID="nope")),
    ("DeleteCache", pb.DeleteCacheRequest(type=T0, ID="nope")),
    ("LoadCache", pb.LoadCacheRequest(type=T0, ID="nope", targetPath="/tmp/x")),
    ("SaveFinalCache", pb.SaveCacheRequest(cache=pb.Cache(type=T0, ID="nope"))),
])
def test_missing_cache_is_not_found(bundles, method, request_):
    code, _ = code_of(getattr(bundles.stub, method), request_)
    assert code == grpc.StatusCode.NOT_FOUND


def test_subtype_mismatch_is_not_found(bundles):
    bundles.save(T0, "st", bundles.tree("s", {"a": b""}))
    code, _ = code_of(lambda _: bundles.get(T0, "st", subtype="other"), None)
    assert code == grpc.StatusCode.NOT_FOUND
    assert bundles.get(T0, "st", subtype=SUBTYPE).ID == "st"
