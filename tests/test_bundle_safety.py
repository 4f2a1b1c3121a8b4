"""Bundle caches as root: path traversal, symlinks, special files, crashes."""

import os
import signal
import socket
import threading
import time

import grpc
import pytest

from conftest import Daemon
from epm_server.reconcile import reconcile
from epm_server.records import Record, Records
from test_bundle import T0, T1, Bundles, bundles, read_tree  # noqa: F401
from test_service import code_of


def denied(call):
    code, details = code_of(lambda _: call(), None)
    return code, details


@pytest.fixture
def outside(tmp_path):
    """A directory no client may read or write through the daemon."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(b"secret")
    return path


@pytest.mark.parametrize("bad_id", ["..", "../x", "a/b", "", "x" * 65, "a\0b"])
def test_bad_ids_are_invalid_everywhere(bundles, bad_id):
    source = bundles.tree("s", {"a": b""})
    bundles.save(T0, "good", source)
    calls = [
        lambda: bundles.save(T0, bad_id, source),
        lambda: bundles.save(T1, "child", source, parent=(T0, bad_id)),
        lambda: bundles.get(T0, bad_id),
        lambda: bundles.load(T0, bad_id, bundles.allowed / "o"),
        lambda: bundles.delete(T0, bad_id),
    ]
    for call in calls:
        code, details = denied(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert sorted(os.listdir(bundles.root / T0)) == ["good"]


@pytest.mark.parametrize("path, expected", [
    ("relative/path", grpc.StatusCode.INVALID_ARGUMENT),
    ("{allowed}/../outside/secret", grpc.StatusCode.INVALID_ARGUMENT),
    ("{outside}/secret", grpc.StatusCode.PERMISSION_DENIED),
    ("{allowed}", grpc.StatusCode.PERMISSION_DENIED),
])
def test_source_outside_the_allowed_roots_is_refused(bundles, outside, path,
                                                     expected):
    source = path.format(allowed=bundles.allowed, outside=outside)
    code, details = denied(lambda: bundles.save(T0, "x", source))
    assert code == expected, details
    assert bundles.list(T0) == []


def test_source_through_a_symlinked_directory_is_refused(bundles, outside):
    (bundles.allowed / "link").symlink_to(outside)

    code, details = denied(lambda: bundles.save(T0, "x", bundles.allowed / "link"
                                                / "secret"))

    assert code == grpc.StatusCode.PERMISSION_DENIED and "symlink" in details


def test_symlinks_inside_a_tree_are_copied_as_links_never_followed(bundles,
                                                                  outside):
    source = bundles.tree("s", {"real": b"r"})
    (source / "leak").symlink_to(outside / "secret")
    (source / "dirleak").symlink_to(outside)

    assert bundles.save(T0, "links", source).ok
    assert bundles.load(T0, "links", bundles.allowed / "out").ok

    data = bundles.root / T0 / "links" / "data"
    assert os.readlink(data / "leak") == str(outside / "secret")
    assert os.readlink(bundles.allowed / "out" / "dirleak") == str(outside)
    assert bundles.get(T0, "links").size == 1


def test_target_through_a_symlink_is_refused(bundles, outside):
    bundles.save(T0, "t", bundles.tree("s", {"secret": b"overwritten"}))
    (bundles.allowed / "link").symlink_to(outside)

    code, _ = denied(lambda: bundles.load(T0, "t", bundles.allowed / "link" / "x"))

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert not (outside / "x").exists()


def test_a_symlink_in_the_target_tree_is_replaced_not_followed(bundles, outside):
    bundles.save(T0, "t", bundles.tree("s", {"secret": b"from cache"}))
    target = bundles.allowed / "target"
    target.mkdir()
    (target / "secret").symlink_to(outside / "secret")

    assert bundles.load(T0, "t", target).ok

    assert (outside / "secret").read_bytes() == b"secret"
    assert not (target / "secret").is_symlink()
    assert (target / "secret").read_bytes() == b"from cache"


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_special_files_are_refused(bundles, kind):
    source = bundles.tree("s", {"ok": b"1"})
    if kind == "fifo":
        os.mkfifo(source / "special")
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(source / "special"))
        sock.close()

    code, details = denied(lambda: bundles.save(T0, "sp", source))

    assert code == grpc.StatusCode.INVALID_ARGUMENT and kind in details
    assert bundles.list(T0) == [] and os.listdir(bundles.root / ".tmp") == []


def test_a_device_file_is_refused(bundles):
    code, details = denied(lambda: bundles.save(T0, "dev", "/dev/null"))
    assert code == grpc.StatusCode.PERMISSION_DENIED, details


def test_the_daemons_own_data_is_never_a_source_or_target(make_daemon, tmp_path):
    daemon = make_daemon(f'[bundle]\nallowed_roots = ["{tmp_path}"]\n')
    b = Bundles(daemon, tmp_path)
    for path in (b.root / "epm.db", b.root, daemon.dir):
        code, details = denied(lambda: b.save(T0, "db", path))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "own data" in details
    b.save(T0, "ok", b.tree("src", {"a": b""}))
    code, _ = denied(lambda: b.load(T0, "ok", b.root / "x"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    b.channel.close()


def test_no_allowed_roots_by_default(daemon, tmp_path):
    b = Bundles(daemon, tmp_path)
    code, details = denied(lambda: b.save(T0, "x", tmp_path / "config.toml"))
    b.channel.close()
    assert code == grpc.StatusCode.PERMISSION_DENIED and "allowed_roots" in details


def test_reconcile_repairs_each_kind_of_debris(tmp_path):
    root = tmp_path / "root"
    records = Records(str(root / "epm.db"), 5)
    (root / ".tmp" / "half-save" / "data").mkdir(parents=True)
    (root / T0 / "kept" / "data").mkdir(parents=True)
    (root / T0 / "unrecorded" / "data").mkdir(parents=True)
    (root / T0 / "kept" / T1 / "stray" / "data").mkdir(parents=True)
    records.insert(Record(T0, "kept", "s", "", "", f"{T0}/kept", 0, 1))
    records.insert(Record(T0, "nodata", "s", "", "", f"{T0}/nodata", 0, 1))
    records.insert(Record(T1, "orphan", "s", T0, "gone",
                          f"{T0}/gone/{T1}/orphan", 0, 1))

    repairs = reconcile(str(root), records)

    assert sorted(repairs) == sorted([
        ("unfinished_save_removed", ".tmp/half-save"),
        ("record_without_data_dropped", f"{T0}/nodata"),
        ("record_without_parent_dropped", f"{T0}/gone/{T1}/orphan"),
        ("data_without_record_removed", f"{T0}/unrecorded"),
        ("data_without_record_removed", f"{T0}/kept/{T1}/stray"),
    ])
    assert [r.id for r in records.list()] == ["kept"]
    assert sorted(os.listdir(root / T0)) == ["kept"]
    assert reconcile(str(root), records) == []
    records.close()


def test_sigkill_during_save_leaves_a_consistent_state(make_daemon, tmp_path):
    allowed = tmp_path / "bundles"
    allowed.mkdir()
    extra = f'[bundle]\nallowed_roots = ["{allowed}"]\n'
    daemon = make_daemon(extra)
    b = Bundles(daemon, allowed)
    source = b.tree("big", {f"d{i // 100}/f{i}": b"x" * 8192 for i in range(3000)})
    saver = threading.Thread(target=lambda: denied(lambda: b.save(T0, "big", source)))
    saver.start()

    deadline = time.monotonic() + 20
    while not os.listdir(b.root / ".tmp") and time.monotonic() < deadline:
        time.sleep(0.005)
    assert os.listdir(b.root / ".tmp"), "the save never started"
    daemon.stop(signal.SIGKILL)
    saver.join(10)
    b.channel.close()

    # The killed daemon's socket files remain; the fixture waits for new ones.
    for stale in (daemon.grpc_socket, daemon.handoff_socket):
        stale.unlink()
    again = Daemon(daemon.dir, extra).start()
    try:
        b = Bundles(again, allowed)
        assert b.list(T0) == []
        assert denied(lambda: b.get(T0, "big"))[0] == grpc.StatusCode.NOT_FOUND
        assert os.listdir(b.root / ".tmp") == []
        assert not (b.root / T0 / "big").exists()
        assert "bundle_cache_repaired" in again.log.read_text()
        assert b.save(T0, "big", source).ok
        assert b.get(T0, "big").size == 3000 * 8192
        b.channel.close()
    finally:
        again.stop()


def test_a_symlink_as_the_source_itself_is_refused(bundles, outside):
    """The tester's attack: sourcePath a link to /etc, inside an allowed root."""
    (bundles.allowed / "etclink").symlink_to(outside)
    (bundles.allowed / "filelink").symlink_to(outside / "secret")

    for name in ("etclink", "filelink"):
        source = bundles.allowed / name
        code, details = denied(lambda: bundles.save(T0, name, source))

        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith(f"sourcePath: {source} is a symlink")
    assert bundles.list(T0) == [] and os.listdir(bundles.root / ".tmp") == []
    assert not (bundles.root / T0).exists() or os.listdir(bundles.root / T0) == []


@pytest.mark.parametrize("cache", ["dir", "file"])
@pytest.mark.parametrize("target_kind", ["file", "symlink"])
def test_load_onto_an_existing_file_or_symlink_is_refused(bundles, outside,
                                                          cache, target_kind):
    tree = bundles.tree("s", {"a": b"from cache"})
    bundles.save(T0, "c", tree if cache == "dir" else tree / "a")
    target = bundles.allowed / "target"
    if target_kind == "file":
        target.write_bytes(b"mine")
    else:
        target.symlink_to(outside / "secret")

    code, details = denied(lambda: bundles.load(T0, "c", target))

    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"targetPath: {target} exists and is a {target_kind}")
    assert (outside / "secret").read_bytes() == b"secret"
    if target_kind == "file":
        assert target.read_bytes() == b"mine"
    else:
        assert os.readlink(target) == str(outside / "secret")


def test_a_single_file_cache_onto_a_directory_is_refused(bundles):
    bundles.save(T0, "f", bundles.tree("s", {"a": b"x"}) / "a")
    (bundles.allowed / "dir").mkdir()

    code, details = denied(lambda: bundles.load(T0, "f", bundles.allowed / "dir"))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("targetPath:") and "directory" in details
    assert os.listdir(bundles.allowed / "dir") == []


def test_a_saved_link_never_replaces_a_file_in_a_merge(bundles, outside):
    source = bundles.tree("s", {"keep": b"k"})
    (source / "conf").symlink_to(outside / "secret")
    bundles.save(T0, "l", source)
    target = bundles.allowed / "target"
    target.mkdir()
    (target / "conf").write_bytes(b"the container's own")

    code, details = denied(lambda: bundles.load(T0, "l", target))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (f"targetPath: {target}/conf is a symlink and would "
                       "replace a file")
    assert (target / "conf").read_bytes() == b"the container's own"


def test_a_load_never_writes_through_a_link_an_earlier_load_made(bundles,
                                                                 outside):
    """A link loaded into the target stays a link: a second cache with a
    directory of the same name is refused there, not written through it."""
    links = bundles.allowed / "links"
    links.mkdir()
    (links / "d").symlink_to(outside)
    bundles.save(T0, "links", links)
    bundles.save(T0, "files", bundles.tree("files", {"d/secret": b"overwritten"}))
    target = bundles.allowed / "target"

    assert bundles.load(T0, "links", target).ok
    code, details = denied(lambda: bundles.load(T0, "files", target))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "is a directory but the target is a symlink" in details
    assert (outside / "secret").read_bytes() == b"secret"
    assert os.readlink(target / "d") == str(outside)


def test_reconcile_drops_a_cache_whose_data_is_a_symlink(tmp_path):
    """What an older daemon left after saving a symlinked sourcePath."""
    root = tmp_path / "root"
    records = Records(str(root / "epm.db"), 5)
    (root / T0 / "b1").mkdir(parents=True)
    (root / T0 / "b1" / "data").symlink_to("/etc")
    (root / T0 / "b1" / T1 / "child" / "data").mkdir(parents=True)
    records.insert(Record(T0, "b1", "s", "", "", f"{T0}/b1", 0, 1))
    records.insert(Record(T1, "child", "s", T0, "b1", f"{T0}/b1/{T1}/child", 0, 1))

    repairs = reconcile(str(root), records)

    assert sorted(repairs) == sorted([
        ("record_with_symlink_data_dropped", f"{T0}/b1"),
        ("record_without_parent_dropped", f"{T0}/b1/{T1}/child"),
        ("data_without_record_removed", f"{T0}/b1"),
    ])
    assert records.list() == [] and os.listdir(root / T0) == []
    assert os.path.isdir("/etc")
    records.close()
