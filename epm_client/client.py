"""The epm client: check enclaves out and in, and administer the pools.

Check-out, check-in and save-final travel on the daemon's hand-off socket,
one round trip each, with the enclave fd in SCM_RIGHTS (DESIGN.md section 3,
"Our hand-off"). Listing, deleting and health checks use the gRPC API, and
only they import grpc and its stubs: the PAL checks enclaves out in a process
that starts for every container, where importing grpc alone would cost about
90 ms and its threads would be inherited by a forked workload.
"""

import array
import collections
import errno
import os
import socket
import struct
import time

from epm_api import framing
from epm_client import errors, wire
from epm_client.types import ENCLAVE_POOL, Identity, LayoutEntry

DEFAULT_SOCKET = "/var/run/epm/epm.sock"
HANDOFF_SOCKET_NAME = "epm-handoff.sock"

# A local daemon answers in microseconds; these bound a stuck or dead one.
CONNECT_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 5.0
RPC_TIMEOUT_S = 5.0

# One recvmsg takes a whole reply: a check-out reply is about 150 bytes.
_RECV_SIZE = 4096
# Room for one descriptor more than a reply may carry, so that a second one
# is seen (and closed) rather than silently truncated.
_CMSG_SIZE = socket.CMSG_SPACE(2 * array.array("i").itemsize)
# Seconds a client looks for a reply without sleeping, before it blocks.
# Waking a sleeping process costs this 2-core VM about 50 us, as much as the
# daemon's own work, and a lone client's reply mostly comes within 100 us.
# When _SPIN_MISSES replies in a row do not (the daemon is busy with other
# clients), the next _SPIN_BACKOFF requests do not look: clients that always
# polled took the CPUs the daemon needs, and halved the pairs per second of
# four clients.
SPIN_S = 0.0001
_SPIN_MISSES = 3
_SPIN_BACKOFF = 128
# socket's flags are enum members, and ``&`` on one costs about 1 us.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_RECV_NOW = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)


def default_socket():
    """The daemon's gRPC socket: $EPM_SOCKET, or the system default."""
    return os.environ.get("EPM_SOCKET") or DEFAULT_SOCKET


class CheckedOut:
    """An enclave checked out of the pool; the caller owns ``fd``.

    A plain class, not a dataclass: see ``epm_client.types``.
    """

    __slots__ = ("fd", "layout", "identity", "pool_id")

    def __init__(self, fd, layout, identity, pool_id):
        self.fd = fd
        self.layout = layout
        self.identity = identity
        self.pool_id = pool_id

    def __repr__(self):
        return (f"CheckedOut(fd={self.fd!r}, layout={self.layout!r}, "
                f"identity={self.identity!r}, pool_id={self.pool_id!r})")

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return ((self.fd, self.layout, self.identity, self.pool_id)
                == (other.fd, other.layout, other.identity, other.pool_id))

    __hash__ = None  # mutable, so not hashable


class PoolEntry(collections.namedtuple(
        "PoolEntry", "type subtype id state created layout identity")):
    """One entry of a pool, as ListCache reports it; ``identity`` may be None."""

    __slots__ = ()


class Client:
    """A connection to one epm daemon, opened lazily and kept for reuse.

    Not thread-safe: give each thread its own client.
    """

    def __init__(self, socket_path=None):
        self.socket_path = os.fspath(socket_path or default_socket())
        self.handoff_path = os.path.join(os.path.dirname(self.socket_path),
                                         HANDOFF_SOCKET_NAME)
        self._conn = None
        self._channel = None
        self._stub = None
        # Serialized requests by their content: a PAL or a warm client asks
        # for the same identity again and again.
        self._encoded = {}
        # Replies missed in a row by polling, and requests left before the
        # next one polls again.
        self._spin_misses = 0
        self._spin_backoff = 0

    # -- the hand-off socket ------------------------------------------------

    def check_out(self, subtype, identity, hold=False):
        """Take an available enclave of ``subtype`` and ``identity``.

        With ``hold`` the enclave stays in the pool, held by this process as
        if it had checked it in: ``pool_id`` of the result is then the held
        entry's ID, which ``save_final`` takes when the enclave is done with
        (and the daemon discards it if this process dies first).

        Returns a CheckedOut, or None when the pool has no such enclave.
        Raises DaemonUnavailable when the daemon cannot be reached, and the
        EpmError subclass of the daemon's refusal otherwise.
        """
        key = ("out", subtype, identity, hold)
        request = self._encoded.get(key)
        if request is None:
            request = self._remember(
                key, wire.check_out_request(subtype, identity, hold))
        reply, fds = self._round_trip(request)
        if reply.enclave is None:
            framing.close_all(fds)
            return None
        if len(fds) != 1:
            framing.close_all(fds)
            raise errors.ProtocolError(
                f"check-out reply carried {len(fds)} descriptors, expected 1")
        if reply.enclave.identity != identity:
            framing.close_all(fds)
            raise errors.ProtocolError(
                f"daemon handed out enclave {reply.id} of another identity")
        return CheckedOut(fd=fds[0], layout=reply.enclave.layout,
                          identity=identity, pool_id=reply.id)

    def check_in(self, fd, subtype, layout, identity, available=False):
        """Hand ``fd`` to the pool, held for this process; return its ID.

        The caller keeps its own copy of ``fd`` and may go on using the
        enclave; ``save_final`` makes it available to others. With
        ``available`` the daemon does that at once, in the same round trip:
        for a caller done with the enclave, which should then close its copy
        of ``fd`` and must not save it final.
        """
        key = ("in", subtype, tuple(layout), identity, available)
        request = self._encoded.get(key)
        if request is None:
            request = self._remember(key, wire.check_in_request(
                subtype, layout, identity, available))
        reply, fds = self._round_trip(request, fd=fd)
        framing.close_all(fds)
        if not reply.id:
            raise errors.ProtocolError("check-in reply carried no ID")
        return reply.id

    def save_final(self, pool_id, discard=False):
        """Make the held enclave ``pool_id`` available for check-out.

        With ``discard`` the daemon closes it instead: for an enclave that
        turned out unusable. Only its holder's uid (or root) may ask.
        """
        _, fds = self._round_trip(wire.save_final_request(pool_id, discard))
        framing.close_all(fds)

    def _remember(self, key, request):
        if len(self._encoded) >= 64:
            self._encoded.clear()
        self._encoded[key] = request
        return request

    def _round_trip(self, request, fd=None):
        """Send one request frame and read its reply: one syscall each way.

        The socket is blocking with kernel send and receive timeouts
        (SO_SNDTIMEO, SO_RCVTIMEO) set once when it connects, so no call
        here changes the socket's mode: the reply is first looked for with
        MSG_DONTWAIT for up to SPIN_S, then waited for. The deadline bounds
        the loops that a short read or write needs.
        """
        conn = self._connect()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        try:
            _send_frame(conn, request, fd, deadline)
            first = self._poll_reply(conn)
            payload, fds = _recv_frame(conn, deadline, first)
        except (OSError, framing.FramingError) as e:
            self._drop_connection()
            if isinstance(e, BlockingIOError):
                e = "timed out"
            raise errors.DaemonUnavailable(
                f"hand-off with epm at {self.handoff_path} failed: {e}") from None
        if payload is None:
            self._drop_connection()
            raise errors.DaemonUnavailable(
                f"epm at {self.handoff_path} closed the connection")
        try:
            reply = wire.parse_reply(payload)
        except wire.WireError as e:
            framing.close_all(fds)
            self._drop_connection()
            raise errors.ProtocolError(f"unparseable hand-off reply: {e}") from e
        if reply.code != 0:
            framing.close_all(fds)
            raise errors.from_code(reply.code, reply.message)
        return reply, fds

    def _poll_reply(self, conn):
        """The reply's first recvmsg if it came while polling, else None."""
        if self._spin_backoff:
            self._spin_backoff -= 1
            return None
        first = _poll_reply(conn, SPIN_S)
        if first is not None:
            self._spin_misses = 0
        else:
            self._spin_misses += 1
            if self._spin_misses == _SPIN_MISSES:
                self._spin_misses = 0
                self._spin_backoff = _SPIN_BACKOFF
        return first

    def _connect(self):
        if self._conn is not None:
            return self._conn
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        conn.settimeout(CONNECT_TIMEOUT_S)
        try:
            conn.connect(self.handoff_path)
        except OSError as e:
            conn.close()
            raise _unreachable(self.handoff_path, e) from e
        conn.settimeout(None)
        timeout = _timeval(REQUEST_TIMEOUT_S)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        self._conn = conn
        return conn

    def _drop_connection(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the gRPC API ---------------------------------------------------------

    def health(self):
        """True when the daemon answers Healthz with ok."""
        pb = _stubs()
        return self._call("Healthz", pb.HealthzRequest(type=ENCLAVE_POOL)).ok

    def list(self, subtype="", pool_type=ENCLAVE_POOL, page=500):
        """Every entry of ``pool_type`` (optionally of one subtype), by ID."""
        pb = _stubs()
        entries = []
        last = ""
        while True:
            reply = self._call("ListCache", pb.ListCacheRequest(
                type=pool_type, subType=subtype, lastCacheID=last, limit=page))
            entries.extend(_entry_from(cache) for cache in reply.caches)
            if len(reply.caches) < page:
                return entries
            last = reply.caches[-1].ID

    def delete(self, pool_id, subtype="", pool_type=ENCLAVE_POOL):
        """Remove one entry from the pool; raise NotFound if it is not there."""
        pb = _stubs()
        self._call("DeleteCache", pb.DeleteCacheRequest(
            type=pool_type, subType=subtype, ID=pool_id))

    def flush(self, subtype="", pool_type=ENCLAVE_POOL):
        """Delete every available entry (of ``subtype`` if given).

        Returns ``(deleted, kept)``: entries still in use (held by their
        container, or in a hand-off) are kept, and ones that left the pool
        while flushing are not counted.
        """
        deleted = kept = 0
        for entry in self.list(subtype, pool_type):
            if entry.state != "available":
                kept += 1
                continue
            try:
                self.delete(entry.id, entry.subtype, pool_type)
                deleted += 1
            except errors.NotFound:
                pass
            except errors.FailedPrecondition:
                kept += 1
        return deleted, kept

    def _call(self, method, request):
        import grpc
        from epm_api import v1alpha1_pb2_grpc as pb_grpc
        if self._stub is None:
            probe_socket(self.socket_path)
            self._channel = grpc.insecure_channel(f"unix:{self.socket_path}")
            self._stub = pb_grpc.EnclavePoolManagerStub(self._channel)
        try:
            return getattr(self._stub, method)(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    def close(self):
        """Close the hand-off connection and the gRPC channel."""
        self._drop_connection()
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _entry_from(cache):
    enclave = _stubs().Enclave()
    identity = None
    layout = ()
    if cache.HasField("options") and cache.options.Unpack(enclave):
        layout = tuple(LayoutEntry.from_proto(e) for e in enclave.layout)
        if enclave.HasField("identity"):
            identity = Identity.from_proto(enclave.identity)
    return PoolEntry(type=cache.type, subtype=cache.subType, id=cache.ID,
                     state=enclave.state, created=cache.created, layout=layout,
                     identity=identity)


def _stubs():
    # Only the gRPC API needs the protobuf runtime (about 38 ms to import);
    # the hand-off path encodes its messages itself (epm_client.wire).
    from epm_api import v1alpha1_pb2
    return v1alpha1_pb2


def _timeval(seconds):
    return struct.pack("@ll", int(seconds), int(seconds % 1 * 1e6))


def _send_frame(conn, payload, fd, deadline):
    """Header and payload in one sendmsg, with ``fd`` in SCM_RIGHTS if given."""
    if len(payload) > framing.MAX_FRAME:
        raise framing.FramingError(
            f"frame of {len(payload)} bytes exceeds {framing.MAX_FRAME}")
    data = framing.HEADER.pack(len(payload)) + payload
    ancillary = []
    if fd is not None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      array.array("i", [fd]).tobytes())]
    sent = conn.sendmsg([data], ancillary)
    while sent < len(data):
        if time.monotonic() > deadline:
            raise framing.FrameTimeout("timed out sending a frame")
        sent += conn.send(data[sent:])


def _poll_reply(conn, seconds):
    """The first recvmsg of a reply, tried without sleeping for ``seconds``.

    Returns its result, or None when nothing came in that time.
    """
    until = time.monotonic() + seconds
    while True:
        try:
            return conn.recvmsg(_RECV_SIZE, _CMSG_SIZE, _RECV_NOW)
        except BlockingIOError:
            if time.monotonic() >= until:
                return None


def _recv_frame(conn, deadline, first=None):
    """One reply frame: ``(payload, fds)``, or ``(None, [])`` at EOF.

    ``first`` is the result of a recvmsg already made (``_poll_reply``). A
    reply usually arrives whole, in one recvmsg. The caller owns the fds.
    """
    fds = []
    buf = b""
    try:
        while True:
            if first is not None:
                (data, ancdata, flags, _), first = first, None
            else:
                data, ancdata, flags, _ = conn.recvmsg(
                    _RECV_SIZE, _CMSG_SIZE, socket.MSG_CMSG_CLOEXEC)
            fds.extend(_fds_from(ancdata))
            if flags & _MSG_CTRUNC:
                raise framing.FramingError("reply carried more descriptors "
                                           "than allowed")
            if not data:
                if buf:
                    raise framing.FramingError(
                        f"epm closed the connection after {len(buf)} bytes")
                framing.close_all(fds)
                return None, []
            buf += data
            if len(buf) >= framing.HEADER.size:
                (length,) = framing.HEADER.unpack_from(buf)
                if length > framing.MAX_FRAME:
                    raise framing.FramingError(
                        f"frame length {length} exceeds {framing.MAX_FRAME}")
                if len(buf) >= framing.HEADER.size + length:
                    if len(buf) > framing.HEADER.size + length:
                        raise framing.FramingError("bytes after the reply")
                    return buf[framing.HEADER.size:], fds
            if time.monotonic() > deadline:
                raise framing.FrameTimeout("timed out receiving a reply")
    except BaseException:
        framing.close_all(fds)
        raise


def _fds_from(ancdata):
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


def probe_socket(path):
    """Connect to ``path`` once and close; raise the client's exception if not.

    gRPC reports every failure to connect as UNAVAILABLE; one plain connect
    first tells a missing, stale or forbidden socket apart.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(CONNECT_TIMEOUT_S)
    try:
        probe.connect(path)
    except OSError as e:
        raise _unreachable(path, e) from None
    finally:
        probe.close()


def _unreachable(path, error):
    """The exception for a failed connect to one of the daemon's sockets."""
    if error.errno in (errno.EACCES, errno.EPERM):
        return errors.PermissionDenied(
            f"permission denied on the epm socket {path}: it admits root and "
            "the daemon's group")
    if error.errno == errno.ENOENT:
        return errors.DaemonUnavailable(
            f"epm is not reachable: no socket at {path} (is the daemon running?)")
    if error.errno == errno.ECONNREFUSED:
        return errors.DaemonUnavailable(
            f"epm is not reachable: nothing listens on {path} (a socket left by "
            "a daemon that is gone)")
    return errors.DaemonUnavailable(
        f"epm is not reachable at {path}: {error.strerror or error}")
