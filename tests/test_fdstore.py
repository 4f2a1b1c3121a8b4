"""The fd store, against a test that plays systemd's part.

``FakeSystemd`` owns the notify socket: it keeps the fds sent with
``FDSTORE=1`` by name and closes them on ``FDSTOREREMOVE=1``, as systemd
does; a restarted daemon gets them back at fd 3 onwards.
"""

import array
import fcntl
import json
import os
import socket
import sys
import threading
import time

import pytest

from conftest import Daemon
from epm_client import Client, Identity, LayoutEntry
from epm_server import enclave, fdstore, systemd
from epm_server.pool import Owner, Pool, State

SIZE = 1 << 20
BASE = 0x7E0000000000
LAYOUT = [LayoutEntry(BASE, 4096), LayoutEntry(BASE + 4096, SIZE - 4096, execute=True)]
IDENTITY = Identity(mrenclave=b"\x11" * 32, mrsigner=b"\x22" * 32, attributes=0x4,
                    xfrm=0x3, size=SIZE, backend="sim")
SUBTYPE = "skeleton-0.0.0"


class FakeSystemd:
    """A datagram notify socket whose thread keeps FDSTORE fds by name."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.store = {}  # name -> [fd]
        self.messages = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        space = socket.CMSG_SPACE(16 * array.array("i").itemsize)
        while not self._stopping.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, space)
            except TimeoutError:
                continue
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            with self._lock:
                self._apply(dict(line.split("=", 1)
                                 for line in data.decode().splitlines()), list(fds))

    def _apply(self, fields, fds):
        self.messages.append(fields)
        name = fields.get("FDNAME", "")
        if fields.get("FDSTOREREMOVE") == "1":
            for fd in self.store.pop(name, []):
                os.close(fd)
        elif fields.get("FDSTORE") == "1":
            kept = self.store.setdefault(name, [])
            for fd in fds:
                # systemd keeps one copy of an open file however often sent.
                if any(_same_file(fd, other) for other in kept):
                    os.close(fd)
                else:
                    kept.append(fd)
        else:
            for fd in fds:
                os.close(fd)

    def names(self):
        with self._lock:
            return set(self.store)

    def wait_for(self, predicate, timeout=10):
        """Wait until ``predicate(self)`` holds; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self):
                    return
            time.sleep(0.02)
        raise AssertionError(f"timed out; store holds {sorted(self.store)}, "
                             f"messages {self.messages}")

    def close(self):
        self._stopping.set()
        self._thread.join()
        self.sock.close()
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)


def _same_file(a, b):
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.fixture
def fake_systemd(tmp_path, monkeypatch):
    fake = FakeSystemd(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", fake.path)
    yield fake
    fake.close()


# Puts the fds named on its command line at 3.., says so in LISTEN_* and
# becomes the daemon, as systemd does before it runs ExecStart.
WRAPPER = """
import fcntl, os, sys
count, pid, names = int(sys.argv[1]), sys.argv[2], sys.argv[3]
fds = [int(fd) for fd in sys.argv[4:4 + count]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(count), LISTEN_FDNAMES=names,
                  LISTEN_PID=pid or str(os.getpid()))
os.execv(sys.executable, [sys.executable] + sys.argv[4 + count:])
"""


class RestartedDaemon(Daemon):
    """A daemon started the way systemd restarts it: stored fds at 3.."""

    def __init__(self, tmp_path, passed, listen_pid=""):
        super().__init__(tmp_path)
        self.log = tmp_path / "epm-restarted.log"
        self.passed = passed  # [(fd, name)]
        self.listen_pid = listen_pid

    def start(self, timeout=30):
        fds = [fd for fd, _ in self.passed]
        names = ":".join(name for _, name in self.passed)
        argv = [sys.executable, "-c", WRAPPER, str(len(fds)), self.listen_pid,
                names, *map(str, fds), *self.command()[1:]]
        return self._launch(argv, timeout, pass_fds=fds)


def sealed_memfd(content, size=SIZE):
    fd = os.memfd_create("epm-sim-enclave", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, content, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def pooled(client, content):
    """Check in a memfd holding ``content``, save it final; return its ID."""
    fd = sealed_memfd(content)
    try:
        pool_id = client.check_in(fd, SUBTYPE, LAYOUT, IDENTITY)
        client.save_final(pool_id)
    finally:
        os.close(fd)
    return pool_id


def checked_out_content(client):
    """Check one enclave out; return (its ID, its first bytes) or None."""
    out = client.check_out(SUBTYPE, IDENTITY)
    if out is None:
        return None
    try:
        return out.pool_id, os.pread(out.fd, 32, 0).rstrip(b"\0")
    finally:
        os.close(out.fd)


def test_pooled_enclaves_survive_a_restart_with_their_memory(tmp_path,
                                                             fake_systemd):
    a = Daemon(tmp_path).start()
    contents = [b"first enclave", b"second enclave", b"third enclave"]
    with Client(a.grpc_socket) as client:
        ids = [pooled(client, content) for content in contents]
        fake_systemd.wait_for(lambda s: set(s.store) == {
            fdstore.fd_name(i) for i in ids})
        # The oldest goes out before the restart and must not come back.
        assert checked_out_content(client) == (ids[0], contents[0])
    survivors = {fdstore.fd_name(i) for i in ids[1:]}
    fake_systemd.wait_for(lambda s: set(s.store) == survivors)
    assert a.stop() == 0

    # A clean shutdown leaves the store as it was.
    time.sleep(0.2)
    assert fake_systemd.names() == survivors
    passed = [(fds[0], name) for name, fds in sorted(fake_systemd.store.items())]
    b = RestartedDaemon(tmp_path, passed).start()
    try:
        with Client(b.grpc_socket) as client:
            found = {checked_out_content(client), checked_out_content(client)}
            assert checked_out_content(client) is None
    finally:
        b.stop()

    assert found == {(ids[1], contents[1]), (ids[2], contents[2])}
    assert [e["count"] for e in b.events("fdstore_adopted")] == [2]
    assert b.events("fdstore_dropped") == []


def test_restart_drops_what_it_cannot_match(tmp_path, fake_systemd):
    a = Daemon(tmp_path).start()
    with Client(a.grpc_socket) as client:
        kept = pooled(client, b"kept")
    fake_systemd.wait_for(lambda s: fdstore.fd_name(kept) in s.store)
    assert a.stop() == 0
    stray = sealed_memfd(b"stray")

    passed = [(fake_systemd.store[fdstore.fd_name(kept)][0], fdstore.fd_name(kept)),
              (stray, "epm-nometadata")]
    b = RestartedDaemon(tmp_path, passed).start()
    try:
        with Client(b.grpc_socket) as client:
            assert checked_out_content(client) == (kept, b"kept")
            assert checked_out_content(client) is None
    finally:
        b.stop()
        os.close(stray)

    [dropped] = b.events("fdstore_dropped")
    assert (dropped["name"], dropped["reason"]) == ("epm-nometadata", "no_metadata")
    assert {"FDSTOREREMOVE": "1", "FDNAME": "epm-nometadata"} in fake_systemd.messages


def test_listen_fds_of_another_pid_are_not_adopted(tmp_path, fake_systemd):
    a = Daemon(tmp_path).start()
    with Client(a.grpc_socket) as client:
        kept = pooled(client, b"kept")
    fake_systemd.wait_for(lambda s: fdstore.fd_name(kept) in s.store)
    assert a.stop() == 0

    passed = [(fake_systemd.store[fdstore.fd_name(kept)][0], fdstore.fd_name(kept))]
    b = RestartedDaemon(tmp_path, passed, listen_pid="1").start()
    try:
        with Client(b.grpc_socket) as client:
            assert checked_out_content(client) is None
    finally:
        b.stop()
    assert [e["count"] for e in b.events("fdstore_adopted")] == [0]


# -- the store and adoption in one process ------------------------------------


def server_identity():
    return enclave.Identity(**IDENTITY._asdict())


def server_layout():
    return tuple(enclave.LayoutEntry(*e) for e in LAYOUT)


@pytest.fixture
def store(tmp_path, fake_systemd):
    pool = Pool(16, 16)
    fds = fdstore.FdStore(pool, str(tmp_path / "fdstore"))
    fds.start()
    yield pool, fds
    pool.close()
    fds.stop()


def available(pool, content=b"x", entry_id=None):
    fd = sealed_memfd(content)
    entry_id = pool.check_in(SUBTYPE, server_identity(), server_layout(), fd,
                             owner=None, entry_id=entry_id)
    pool.save_final(entry_id)
    return entry_id


def test_lease_removes_and_release_stores_again(store, fake_systemd, tmp_path):
    """An enclave leaves the store before its fd can reach a client."""
    pool, _ = store
    entry_id = available(pool)
    name = fdstore.fd_name(entry_id)
    fake_systemd.wait_for(lambda s: name in s.store)
    metadata = tmp_path / "fdstore" / f"{entry_id}.json"
    assert json.loads(metadata.read_text())["subtype"] == SUBTYPE

    pool.lease(SUBTYPE, server_identity())
    assert not metadata.exists()
    fake_systemd.wait_for(lambda s: name not in s.store)

    pool.release(entry_id)
    fake_systemd.wait_for(lambda s: name in s.store)
    assert metadata.exists()


def test_deleted_enclave_leaves_the_store(store, fake_systemd):
    pool, _ = store
    entry_id = available(pool)
    fake_systemd.wait_for(lambda s: fdstore.fd_name(entry_id) in s.store)

    pool.delete(entry_id)

    fake_systemd.wait_for(lambda s: not s.store)


def test_held_enclave_is_not_stored(store, fake_systemd):
    pool, _ = store
    held = pool.check_in(SUBTYPE, server_identity(), server_layout(),
                         sealed_memfd(b"held"), owner=None)
    stored = available(pool)

    fake_systemd.wait_for(lambda s: fdstore.fd_name(stored) in s.store)
    assert fdstore.fd_name(held) not in fake_systemd.names()


def test_adoption_keeps_id_metadata_and_memory(store, fake_systemd, tmp_path):
    pool, _ = store
    entry_id = available(pool, b"remembered", entry_id="legacy-id_1")
    name = fdstore.fd_name(entry_id)
    fake_systemd.wait_for(lambda s: name in s.store)
    before = pool.get(entry_id)
    restarted = Pool(16, 16)
    fd = os.dup(fake_systemd.store[name][0])

    count = fdstore.FdStore(restarted, str(tmp_path / "fdstore")).adopt([(fd, name)])

    entry = restarted.get(entry_id)
    assert count == 1 and entry.state is State.AVAILABLE
    assert (entry.subtype, entry.identity, entry.layout, entry.created,
            entry.origin) == (before.subtype, before.identity, before.layout,
                              before.created, before.origin)
    assert os.pread(entry.fd, 10, 0) == b"remembered"
    restarted.close()


@pytest.mark.parametrize("make_fd, reason", [
    (lambda: os.pipe()[0], "bad_fd"),
    (lambda: sealed_memfd(b"small", size=SIZE // 2), "bad_fd"),
])
def test_fd_of_the_wrong_kind_is_dropped(store, fake_systemd, tmp_path,
                                         make_fd, reason):
    pool, _ = store
    entry_id = available(pool)
    name = fdstore.fd_name(entry_id)
    fake_systemd.wait_for(lambda s: name in s.store)
    restarted = Pool(16, 16)
    fd = make_fd()

    count = fdstore.FdStore(restarted, str(tmp_path / "fdstore")).adopt([(fd, name)])

    assert count == 0 and len(restarted) == 0
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
    fake_systemd.wait_for(lambda s: name not in s.store)
    assert not (tmp_path / "fdstore" / f"{entry_id}.json").exists()


def test_unknown_names_and_stale_metadata_are_dropped(tmp_path, fake_systemd):
    directory = tmp_path / "fdstore"
    directory.mkdir()
    (directory / "gone.json").write_text("{}")
    (directory / "broken.json").write_text("not json")
    passed = [(sealed_memfd(b"a"), "other-name"), (sealed_memfd(b"b"), ""),
              (sealed_memfd(b"c"), "epm-broken"), (sealed_memfd(b"d"), "epm-../x")]
    pool = Pool(16, 16)

    count = fdstore.FdStore(pool, str(directory)).adopt(passed)

    assert count == 0 and len(pool) == 0
    assert os.listdir(directory) == []
    for fd, _ in passed:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_listen_fds_ignores_another_pid(monkeypatch):
    r, w = os.pipe()
    try:
        monkeypatch.setenv("LISTEN_FDS", "1")
        monkeypatch.setenv("LISTEN_FDNAMES", "epm-x")
        monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
        assert systemd.listen_fds() == []
        assert "LISTEN_FDS" not in os.environ
    finally:
        os.close(r)
        os.close(w)


def test_enclave_checked_out_with_hold_is_not_stored(store, fake_systemd):
    """Held by a container, its memory is the container's: not the store's."""
    pool, _ = store
    entry_id = available(pool)
    name = fdstore.fd_name(entry_id)
    fake_systemd.wait_for(lambda s: name in s.store)

    pool.lease(SUBTYPE, server_identity())
    pool.hold(entry_id, Owner(pid=os.getpid(), uid=0))
    fake_systemd.wait_for(lambda s: name not in s.store)

    pool.save_final(entry_id)
    fake_systemd.wait_for(lambda s: name in s.store)
