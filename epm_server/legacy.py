"""The published clients' fd hand-off: one socket file per request ID.

DESIGN section 3, "The legacy fd hand-off": whoever receives the fd listens
on ``<socket dir>/<ID>`` and unlinks it; whoever sends it connects and writes
one byte ``\\0`` with the fd in SCM_RIGHTS. The published daemon blocked a
request thread on a client that never came; here the wait for a check-in runs
in its own thread with a deadline, and a check-out's connect is retried for
a bounded time, so no request thread and no socket file outlives its timeout.
"""

import array
import errno
import os
import socket
import stat
import threading
import time

import structlog
from google.protobuf.message import DecodeError

from epm_api import v1alpha1_pb2 as pb
from epm_server import fdcheck
from epm_server.enclave import (
    check_layout_fits, identity_from_proto, layout_from_proto,
    subtype_from_request)
from epm_server.errors import (
    AlreadyExists, EpmError, InvalidArgument, PermissionDenied, Unavailable,
    shown)
from epm_server.ids import validate_id
from epm_server.peers import peer_of
from epm_server.pool import ANY_IDENTITY, Owner
from epm_server.sockets import listen_unix, unlink_socket
from epm_server.workers import Workers

log = structlog.get_logger(__name__)

_FD_SIZE = array.array("i").itemsize
# Room for two fds, so that a client sending two is seen and refused.
_CMSG_SPACE = socket.CMSG_SPACE(2 * _FD_SIZE)
# How often a waiting check-in looks at the stop flag.
_POLL = 0.2
_CONNECT_RETRY = 0.02
# GetCache calls retrying the connect to a late listener at once; a call
# past them fails at once, so that they cannot take every gRPC thread.
_MAX_LATE_WAITS = 2
# Reasons kept for check-ins dropped after SaveCache answered (``refusal``).
_REFUSALS_KEPT = 256
_ENCLAVE_TYPE = pb.Enclave.DESCRIPTOR.full_name


class LegacyHandoff:
    """SaveCache and GetCache for published clients, over per-ID sockets."""

    def __init__(self, pool, socket_dir, policy, accept_timeout=10.0,
                 connect_timeout=2.0, io_timeout=5.0):
        self._pool = pool
        self._dir = socket_dir
        self._policy = policy
        self._accept_timeout = accept_timeout
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        # Each waiting check-in blocks a thread; at most max_pending do.
        self._workers = Workers("legacy")
        self._late_waits = 0
        # ID -> why its check-in was dropped in the background.
        self._refusals = {}
        # Accepted check-in connections whose fd has not come yet: stop()
        # shuts them, so that a client that sends nothing cannot hold it.
        self._receiving = set()
        # IDs with a hand-off in flight, either way: a GetCache naming the ID
        # of a waiting check-in would otherwise connect to our own listener.
        self._busy_ids = set()
        self._idle = threading.Condition(self._lock)

    def save_cache(self, cache_id, subtype, options):
        """Add a pending entry and wait in the background for its fd.

        Listens on ``<dir>/<ID>`` before returning, so the client may connect
        as soon as the call answers. Raises InvalidArgument, AlreadyExists,
        ResourceExhausted, Unavailable.
        """
        validate_id(cache_id)
        subtype = subtype_from_request(subtype, "subType")
        enclave = enclave_of_options(options)
        layout = layout_from_proto(enclave, "options")
        identity = None
        if enclave.HasField("identity"):
            identity = identity_from_proto(enclave.identity, "options.identity")
            check_layout_fits(layout, identity.size, "options.layout")
        if self._stopping.is_set():
            raise Unavailable("the daemon is shutting down")
        path = os.path.join(self._dir, cache_id)
        self._claim(cache_id)
        try:
            self._pool.add_pending(cache_id, subtype, identity, layout)
        except EpmError:
            self._unclaim(cache_id)
            raise
        with self._lock:
            self._refusals.pop(cache_id, None)  # an earlier check-in's
        try:
            listener = listen_unix(path, backlog=1)
        except OSError as e:
            self._pool.discard(cache_id)
            self._unclaim(cache_id)
            if e.errno == errno.EADDRINUSE:
                raise AlreadyExists(f"ID: {path} exists already") from None
            raise Unavailable(f"cannot listen on {path}: {e.strerror}") from None
        try:
            self._workers.submit(self._receive, cache_id, identity, layout,
                                 listener, path)
        except RuntimeError as e:
            try:
                unlink_socket(path)
                listener.close()
                self._pool.discard(cache_id)
            finally:
                self._unclaim(cache_id)
            raise Unavailable(f"cannot wait for the fd on {path}: {e}") from None

    def get_cache(self, cache_id, subtype, budget=None):
        """Send an available enclave of ``subtype`` to the client at ``<dir>/<ID>``.

        ``budget`` bounds, in seconds, the wait for a late listener (the
        caller's deadline); None means the configured connect timeout.
        Returns the entry as it was handed out (its ``fd`` is the number the
        daemon had), or None when none is available. Raises InvalidArgument,
        AlreadyExists (the ID has a hand-off in flight), and Unavailable when
        the hand-off failed (the enclave is back). The enclave counts as
        handed out once its fd is queued to the client.
        """
        validate_id(cache_id)
        subtype = subtype_from_request(subtype, "subType")
        if self._stopping.is_set():
            raise Unavailable("the daemon is shutting down")
        wait = self._connect_timeout if budget is None else min(
            self._connect_timeout, max(budget, _CONNECT_RETRY))
        self._claim(cache_id)
        try:
            path = os.path.join(self._dir, cache_id)
            deadline = time.monotonic() + wait
            # A listener not there yet is waited for before the lease: an
            # enclave must not sit leased for a client that may never
            # listen while another client asks for it.
            if not os.path.lexists(path) and self._pool.has_available(subtype):
                try:
                    self._retry(path, deadline, lambda: os.lstat(path))
                except (OSError, EpmError) as e:
                    raise _send_failed(cache_id, path, e) from None
            entry = self._pool.lease(subtype, ANY_IDENTITY)
            if entry is None:
                return None
            try:
                sock = self._send_fd(path, entry.fd, deadline)
            except (OSError, EpmError) as e:
                self._pool.release(entry.id)
                raise _send_failed(cache_id, path, e) from None
            # Sent counts as taken. The message may still be queued, but
            # a client can take the fd without reading it (MSG_PEEK, or a
            # read of no bytes) and then close, so neither an unread queue
            # nor a reset proves that the enclave is not in its hands.
            sock.close()
            self._pool.hand_out(entry.id)
            log.debug("legacy_checked_out", id=cache_id, enclave=entry.id)
            return entry
        finally:
            self._unclaim(cache_id)

    def stop(self):
        """Give up waiting for check-ins; their entries and socket files go.

        A check-in whose client connected but has not sent its fd is dropped
        too (its connection shut, logged as a failed check-in). Also waits
        (bounded) for check-outs in flight, which hold a leased fd that the
        pool closes next.
        """
        self._stopping.set()
        with self._lock:
            for conn in self._receiving:
                _shut(conn)
        with self._idle:
            self._idle.wait_for(lambda: not self._busy_ids,
                                self._connect_timeout + self._io_timeout)
        self._workers.wait_idle(self._io_timeout + 2 * _POLL)

    def refusal(self, cache_id):
        """Why the check-in of ``cache_id`` was dropped after its SaveCache
        answered, or None.

        A published client learns of it only from its SaveFinalCache, maybe
        much later, so the reasons of the last _REFUSALS_KEPT are kept.
        """
        with self._lock:
            return self._refusals.get(cache_id)

    def _remember_refusal(self, cache_id, error):
        reason = error.strerror if isinstance(error, OSError) else None
        with self._lock:
            self._refusals.pop(cache_id, None)
            self._refusals[cache_id] = reason or str(error)
            while len(self._refusals) > _REFUSALS_KEPT:
                del self._refusals[next(iter(self._refusals))]

    def _claim(self, cache_id):
        with self._lock:
            if cache_id in self._busy_ids:
                raise AlreadyExists(f"ID: {cache_id} has a hand-off in flight")
            self._busy_ids.add(cache_id)

    def _unclaim(self, cache_id):
        with self._idle:
            self._busy_ids.discard(cache_id)
            self._idle.notify_all()

    def _receive(self, cache_id, identity, layout, listener, path):
        fd = None
        try:
            try:
                conn = self._accept(listener, path)
            finally:
                # The receiver unlinks: nobody else may connect to this ID.
                unlink_socket(path)
                listener.close()
            with conn:
                peer = peer_of(conn)
                if not self._policy.allows(peer):
                    raise PermissionDenied(f"uid {peer.uid} may not check in")
                fd = self._recv_fd_unless_stopped(conn)
                fdcheck.check_enclave_fd(fd, identity)
                if identity is None:
                    _check_layout_fits_fd(layout, fd)
                self._pool.receive_fd(cache_id, fd, Owner(pid=peer.pid, uid=peer.uid))
                fd = None
        except (EpmError, OSError) as e:
            log.warning("legacy_check_in_failed", id=cache_id, reason=str(e))
            self._remember_refusal(cache_id, e)
            if fd is not None:
                os.close(fd)
            try:
                self._pool.discard(cache_id)
            except EpmError:
                pass  # deleted or discarded meanwhile: nothing left to drop
        finally:
            self._unclaim(cache_id)

    def _accept(self, listener, path):
        deadline = time.monotonic() + self._accept_timeout
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"no client connected to {path} within "
                                  f"{self._accept_timeout:g} s")
            listener.settimeout(min(remaining, _POLL))
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(self._io_timeout)
            return conn
        raise Unavailable("the daemon is shutting down")

    def _recv_fd_unless_stopped(self, conn):
        """Receive the check-in's fd, unless stop() shuts ``conn`` first."""
        with self._lock:
            self._receiving.add(conn)
            if self._stopping.is_set():
                _shut(conn)
        try:
            return self._recv_fd(conn)
        except (EpmError, OSError):
            if self._stopping.is_set():
                raise Unavailable("the daemon is shutting down") from None
            raise
        finally:
            with self._lock:
                self._receiving.discard(conn)

    def _recv_fd(self, conn):
        data, ancdata, flags, _ = conn.recvmsg(1, _CMSG_SPACE,
                                               socket.MSG_CMSG_CLOEXEC)
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % _FD_SIZE])
        if data != b"\0" or len(fds) != 1 or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise InvalidArgument(f"expected one byte \\0 with one fd, got "
                                  f"{data!r} with {len(fds)} fds")
        return fds[0]

    def _send_fd(self, path, fd, deadline):
        """Connect to ``path`` and queue ``fd``; return the connected socket."""
        sock = self._retry(path, deadline,
                           lambda: _connect_socket_file(path, self._io_timeout))
        try:
            peer = peer_of(sock)
            if peer.pid == os.getpid():
                raise PermissionDenied(f"the listener on {path} is the daemon")
            if not self._policy.allows(peer):
                raise PermissionDenied(f"the listener on {path} is uid {peer.uid}")
            fds = array.array("i", [fd])
            sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    fds.tobytes())])
        except BaseException:
            sock.close()
            raise
        return sock

    def _retry(self, path, deadline, attempt):
        """``attempt()`` until it returns, for a listener at ``path`` that is
        late (the client may listen just after its GetCache call) or has a
        full backlog; returns what it returned.

        It is retried until ``deadline`` (monotonic) while it raises
        FileNotFoundError, ConnectionRefusedError or BlockingIOError, and
        then raises that; by at most _MAX_LATE_WAITS calls at once, since
        each holds a gRPC thread. Raises Unavailable when too many wait
        already or the daemon stops; other errors at once.
        """
        waiting = False
        try:
            while True:
                try:
                    return attempt()
                except (FileNotFoundError, ConnectionRefusedError,
                        BlockingIOError):
                    if time.monotonic() >= deadline:
                        raise
                if self._stopping.is_set():
                    raise Unavailable("the daemon is shutting down")
                if not waiting:
                    with self._lock:
                        if self._late_waits >= _MAX_LATE_WAITS:
                            raise Unavailable(
                                f"no listener takes connections on {path}, and "
                                f"{_MAX_LATE_WAITS} check-outs wait for theirs "
                                "already")
                        self._late_waits += 1
                    waiting = True
                time.sleep(_CONNECT_RETRY)
        finally:
            if waiting:
                with self._lock:
                    self._late_waits -= 1


def _send_failed(cache_id, path, error):
    """Log a check-out that sent nothing; returns the Unavailable to raise."""
    reason = (error.strerror if isinstance(error, OSError) and error.strerror
              else str(error))
    log.info("legacy_send_failed", id=cache_id, reason=reason)
    return Unavailable(f"hand-off to {path} failed: {reason}")


def _connect_socket_file(path, io_timeout):
    """Connect to the socket file ``path`` itself, never to one a symlink names.

    The runtime directory is writable by the socket's group; a symlink there
    must not send an enclave to some other listener. The path is opened
    O_PATH without following, and the connect goes through that handle. The
    connect does not block: a full backlog is BlockingIOError at once.
    Raises FileNotFoundError, ConnectionRefusedError, BlockingIOError,
    PermissionDenied.
    """
    handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(handle).st_mode):
            raise PermissionDenied(f"{path} is not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(f"/proc/self/fd/{handle}")
            sock.settimeout(io_timeout)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(handle)


def enclave_of_options(options):
    """The ``v1alpha1.Enclave`` packed in a Cache's ``options``.

    Raises InvalidArgument naming ``options`` and the type when the Any packs
    another type or bytes that do not parse as an Enclave.
    """
    enclave = pb.Enclave()
    try:
        unpacked = options.Unpack(enclave)
    except DecodeError as e:
        raise InvalidArgument(f"options: the {_ENCLAVE_TYPE} it packs does not "
                              f"parse ({shown(e)})") from None
    if not unpacked:
        raise InvalidArgument(f"options: expected a {_ENCLAVE_TYPE}, got "
                              f"{shown(options.type_url or 'nothing', quoted=True)}")
    return enclave


def _shut(conn):
    """Wake a thread blocked reading ``conn``: it reads end of file."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the peer is gone already: the read ends by itself


def _check_layout_fits_fd(layout, fd):
    """A check-in without identity: the layout must fit the fd's own size.

    A memfd's size is its enclave's; the enclave device reports none, and
    there the layout goes unchecked.
    """
    size = os.fstat(fd).st_size
    if size:
        check_layout_fits(layout, size, "options.layout")
