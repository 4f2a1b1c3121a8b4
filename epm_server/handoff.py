"""Our hand-off socket (DESIGN section 3): check-in, save final, check-out.

One thread serves every connection from an epoll loop, and a connection may
carry many requests. A request is read in one recvmsg most of the time
(``framing.FrameReader``), answered at once, and its reply written without
blocking; what the socket does not take is written when it drains. Every
frame read and write is bounded by ``timeout``, the wait between requests by
``idle_timeout``, and the number of connections by ``max_connections``, so a
slow or hostile client costs one table slot and never stalls another.
Connections are shared fairly: one uid holds at most ``max_per_uid`` of
them, and a newcomer past either limit takes the place of the connection
idle the longest (one waiting between requests, never one mid-frame).

A check-out leases the entry, sends its fd, and hands it out once the
client has read the reply (``delivery``): the loop learns it when the
client's next request comes, or its close, and looks again at each tick. A
client that closed without reading may still hold the fd (MSG_PEEK), so the
entry is handed out (closed) then too; only a reply never sent returns it
to the pool. Until then the connection's next request waits; a check-in of
the same enclave on another connection settles it too (``Pool.sent``), so
a client that checks it in on a second socket, or passes it to a process
that does, is not refused. A check-out with ``hold`` settles the same way
(but not at a check-in), except that a read reply leaves the entry held by
the client, its pid watched by the reaper, instead of handed out. The
pool's lock is never held across socket I/O.
"""

import functools
import os
import select
import socket
import struct
import threading
import time

import structlog
from google.protobuf.message import DecodeError

from epm_api import framing
from epm_api import handoff_pb2
from epm_server import delivery, fdcheck, metrics
from epm_server.delivery import Delivery, delivery_state
from epm_server.enclave import (
    check_layout_fits, enclave_proto, identity_from_proto, layout_from_proto,
    subtype_from_request)
from epm_server.errors import EpmError, InvalidArgument, PermissionDenied
from epm_server.ids import validate_id
from epm_server.peers import peer_of
from epm_server.pool import Owner
from epm_server.sockets import listen_unix, unlink_socket

log = structlog.get_logger(__name__)

_OK = 0
# A check-out's reply when the pool has no matching enclave.
_NO_ENCLAVE = handoff_pb2.HandoffReply(code=_OK).SerializeToString()
_INVALID_ARGUMENT = InvalidArgument.code
_RESOURCE_EXHAUSTED = 8
# Seconds to wait before accepting again after accept() failed (EMFILE).
_ACCEPT_BACKOFF = 0.1
# A request is about 200 bytes; larger frames take several reads.
_RECV_SIZE = 4096
# Reading: level-triggered, so a request left in the socket is seen again.
_FD = struct.Struct("i")  # one descriptor in SCM_RIGHTS, a C int
# socket's flags are enum members, and ``&`` on one costs about 1 us.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_READING = select.EPOLLIN | select.EPOLLRDHUP
_WRITING = select.EPOLLOUT
# A check-out reply sent, and an event came while the client had not read it
# (it sent its next request first, or shut its write side): edge-triggered,
# so that the loop does not spin; EPOLLOUT comes when the reply's memory is
# freed, that is when the client read it.
_DELIVERING = (select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP
               | select.EPOLLET)
# Validated check-ins and check-outs kept by their bytes: a runtime sends the
# same request again and again, and its parse and checks cost more than the
# pool's own work.
_KNOWN_REQUESTS = 64
# Seconds the loop looks for the next request without sleeping, after it
# served one. Waking a sleeping thread on this 2-core VM costs more than a
# round trip's own work: a client's next request (save final after check-in,
# check-in after check-out) comes well within it, and then the loop never
# slept. The cost is this much CPU after each burst of requests, no more.
BUSY_POLL = 0.0001


class _Connection:
    """A served connection and where it is in its current request.

    ``lease`` is the entry ID of a check-out whose reply is being written or
    read, and ``hold`` True when its client asked to hold the enclave;
    ``probe`` the look at its delivery registered with the pool once the
    whole reply is queued (none for a hold); ``out``
    the bytes of a reply the socket has not taken, and
    ``out_fd`` the fd to attach to them when none of it went out yet.
    ``idle_since`` is set while the connection waits for a request with
    nothing buffered: only then may it be evicted. ``deadline`` bounds the
    current wait, whichever it is.
    """

    __slots__ = ("sock", "fileno", "peer", "reader", "deadline", "idle_since",
                 "out", "out_fd", "lease", "hold", "probe", "mask")

    def __init__(self, sock, peer, now, idle_timeout):
        self.sock = sock
        self.fileno = sock.fileno()
        self.peer = peer
        self.reader = framing.FrameReader()
        self.idle_since = now
        self.deadline = now + idle_timeout
        self.out = None
        self.out_fd = None
        self.lease = None
        self.hold = False
        self.probe = None
        self.mask = _READING  # what the loop's epoll waits for


class _Request:
    """A check-in or check-out whose fields passed validation.

    ``flag`` is the check-out's ``hold``, or the check-in's ``available``;
    ``layout`` is None for a check-out.
    """

    __slots__ = ("kind", "subtype", "identity", "layout", "flag")

    def __init__(self, kind, subtype, identity, layout, flag):
        self.kind = kind
        self.subtype = subtype
        self.identity = identity
        self.layout = layout
        self.flag = flag


class HandoffServer:
    """Serves the hand-off protocol on a Unix socket from one event loop."""

    def __init__(self, pool, reaper, path, policy, timeout, idle_timeout,
                 uid=None, gid=None, max_connections=64, max_per_uid=16,
                 busy_poll=BUSY_POLL):
        self._pool = pool
        self._reaper = reaper
        self.path = path
        self._policy = policy
        self._timeout = timeout
        self._idle_timeout = idle_timeout
        self._uid, self._gid = uid, gid
        self._max_connections = max_connections
        self._max_per_uid = max_per_uid
        self._busy_poll = busy_poll
        # Deadlines are checked this often; replies in delivery are looked at
        # again too, in case the kernel's wake-up was missed.
        self._tick = min(max(min(timeout, idle_timeout) / 4, 0.005), 0.05)
        self._connections = {}  # fileno -> _Connection
        self._listener = None
        self._epoll = None
        self._wake_fd = None
        self._thread = None
        self._accept_paused_until = None
        self._stopping = threading.Event()
        # (layout, identity) -> a serialized HandoffReply holding only the
        # enclave: a check-out reply is its ID's bytes followed by these.
        self._enclave_replies = {}
        # Request bytes -> _Request, for check-ins and check-outs.
        self._known = {}

    def start(self):
        """Listen on the socket path and start serving. Raises OSError."""
        self._listener = listen_unix(self.path, self._uid, self._gid)
        self._listener.setblocking(False)
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="handoff",
                                        daemon=True)
        self._thread.start()

    def accepting(self):
        """True while the loop runs and the socket takes connections."""
        return (self._thread is not None and self._thread.is_alive()
                and not self._stopping.is_set())

    def stop(self):
        """Stop accepting, let replies in flight finish, remove the socket.

        Connections waiting for a request, or in the middle of one, are
        closed; a reply being written or read gets until its deadline.
        """
        if self._thread is None:
            return
        self._stopping.set()
        unlink_socket(self.path)
        os.eventfd_write(self._wake_fd, 1)
        self._thread.join(self._timeout * 2 + 1)
        self._thread = None
        self._epoll.close()
        os.close(self._wake_fd)

    # -- the loop -------------------------------------------------------------

    def _run(self):
        next_tick = time.monotonic() + self._tick
        served = False
        while True:
            events = self._wait(next_tick, self._busy_poll if served else 0)
            served = False
            for fileno, mask in events:
                conn = self._connections.get(fileno)
                if conn is not None:
                    served = True
                    self._guarded(self._on_event, conn, mask)
                elif self._listener is not None and \
                        fileno == self._listener.fileno():
                    self._accept_all()
            now = time.monotonic()
            if now >= next_tick:
                self._on_tick(now)
                next_tick = now + self._tick
            if self._stopping.is_set() and self._wind_down():
                return

    def _wait(self, next_tick, spin):
        """Return the next events, looked for without sleeping for ``spin``
        seconds first, then waited for until ``next_tick``.
        """
        if spin:
            until = time.monotonic() + spin
            while True:
                events = self._epoll.poll(0)
                if events:
                    return events
                if time.monotonic() >= until:
                    break
        return self._epoll.poll(max(0.0, next_tick - time.monotonic()))

    def _guarded(self, step, conn, *args):
        try:
            step(conn, *args)
        except Exception:
            # One connection's failure must not end the loop that serves all.
            log.exception("handoff_connection_failed", pid=conn.peer.pid)
            self._fail(conn)

    def _on_event(self, conn, mask):
        if conn.out is not None:
            self._flush(conn)
        elif conn.lease is not None:
            if self._check_delivery(conn):
                self._read(conn)
        else:
            self._read(conn)

    def _on_tick(self, now):
        for conn in list(self._connections.values()):
            if conn.out is None and conn.lease is not None:
                self._guarded(self._check_delivery, conn)
            elif now >= conn.deadline:
                # A frame cut short or a client idle for long gets no reply:
                # it would read it as the answer to its next request. It sees
                # the close and reconnects.
                if conn.out is not None:
                    log.info("handoff_reply_failed", reason="timed out",
                             id=conn.lease)
                self._fail(conn)
        if self._accept_paused_until is not None and \
                now >= self._accept_paused_until and self._listener is not None:
            self._accept_paused_until = None
            self._epoll.register(self._listener.fileno(), select.EPOLLIN)

    def _wind_down(self):
        """Close the listener and quiet connections; True when none is left."""
        if self._listener is not None:
            if self._accept_paused_until is None:
                self._epoll.unregister(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for conn in list(self._connections.values()):
            if conn.out is None and conn.lease is None:
                self._close(conn)
        return not self._connections

    # -- connections ----------------------------------------------------------

    def _accept_all(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                # Out of descriptors or memory: the connection waits in the
                # backlog; accepting must go on once some are freed.
                log.warning("handoff_accept_failed", reason=str(e))
                self._epoll.unregister(self._listener.fileno())
                self._accept_paused_until = time.monotonic() + _ACCEPT_BACKOFF
                return
            try:
                self._admit(sock)
            except Exception:
                # One bad connection (peer gone) must not end the service.
                log.exception("handoff_admit_failed")
                sock.close()

    def _admit(self, sock):
        sock.setblocking(False)
        peer = peer_of(sock)
        if not self._policy.allows(peer):
            log.warning("handoff_peer_refused", pid=peer.pid, uid=peer.uid,
                        gid=peer.gid)
            self._refuse(sock, PermissionDenied.code,
                         f"uid {peer.uid} may not use the enclave pool")
            return
        refusal = self._make_room(peer)
        if refusal is not None:
            log.warning("handoff_connections_exhausted", pid=peer.pid,
                        uid=peer.uid, reason=refusal)
            self._refuse(sock, _RESOURCE_EXHAUSTED, refusal)
            return
        conn = _Connection(sock, peer, time.monotonic(), self._idle_timeout)
        self._connections[conn.fileno] = conn
        self._epoll.register(conn.fileno, _READING)
        log.debug("handoff_connected", pid=peer.pid, uid=peer.uid)

    def _make_room(self, peer):
        """Evict one idle connection if ``peer`` has no room; return a refusal.

        Past the per-uid share, the peer's own longest-idle connection goes;
        with the table full, the longest-idle of all. Returns None when there
        is room, else why there is none.
        """
        mine = [c for c in self._connections.values() if c.peer.uid == peer.uid]
        if len(mine) >= self._max_per_uid:
            if self._evict_idlest(mine):
                return None
            return (f"uid {peer.uid} has {len(mine)} connections busy, "
                    f"at most {self._max_per_uid}")
        if len(self._connections) >= self._max_connections:
            if self._evict_idlest(self._connections.values()):
                return None
            return f"too many connections: {len(self._connections)} busy"
        return None

    def _evict_idlest(self, candidates):
        idle = [c for c in candidates if c.idle_since is not None]
        if not idle:
            return False
        conn = min(idle, key=lambda c: c.idle_since)
        log.info("handoff_connection_evicted", pid=conn.peer.pid,
                 uid=conn.peer.uid,
                 idle_s=round(time.monotonic() - conn.idle_since, 3))
        self._close(conn)
        return True

    def _refuse(self, sock, code, message):
        """Tell a peer we drop why, if its socket takes it at once; close it."""
        metrics.refusal_code(code)
        reply = handoff_pb2.HandoffReply(code=code, message=message)
        payload = reply.SerializeToString()
        try:
            sock.send(framing.HEADER.pack(len(payload)) + payload)
        except OSError:
            pass
        sock.close()

    def _close(self, conn):
        del self._connections[conn.fileno]
        self._epoll.unregister(conn.fileno)
        conn.reader.close()
        conn.sock.close()
        log.debug("handoff_disconnected", pid=conn.peer.pid)

    def _fail(self, conn):
        """Close ``conn`` mid-request, settling a lease it carries."""
        if conn.fileno not in self._connections:
            return
        lease, conn.lease = conn.lease, None
        probe, conn.probe = conn.probe, None
        if lease is not None:
            if conn.out is not None and conn.out_fd is not None:
                self._pool.release(lease)  # the fd never left
            else:
                # The peer may hold the fd: it must never go to another.
                self._count_unconfirmed(lease)
                self._pool.hand_out(lease, probe)
        self._close(conn)

    def _set_idle(self, conn, now):
        conn.idle_since = now
        conn.deadline = now + self._idle_timeout

    # -- reading requests -----------------------------------------------------

    def _read(self, conn):
        """Read what the socket holds and answer every whole request in it."""
        while True:
            try:
                data, ancdata, flags, _ = conn.sock.recvmsg(
                    _RECV_SIZE, framing.RECV_CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError:
                self._close(conn)
                return
            fds = framing.fds_from(ancdata)
            if not data:
                framing.close_all(fds)
                if len(conn.reader):
                    self._refuse_frame(conn, f"peer closed after {len(conn.reader)}"
                                       " bytes of a frame")
                self._close(conn)
                return
            if not len(conn.reader):
                # The frame's time runs from its first byte.
                conn.idle_since = None
                conn.deadline = time.monotonic() + self._timeout
            try:
                conn.reader.feed(data, fds)
                if flags & _MSG_CTRUNC:
                    raise framing.FramingError(
                        "frame carried more descriptors than allowed")
                if not self._serve_frames(conn):
                    return
            except framing.FramingError as e:
                self._refuse_frame(conn, str(e))
                self._fail(conn)
                return
            if len(data) < _RECV_SIZE or conn.out is not None \
                    or conn.lease is not None:
                # Drained (a short read), or busy until a reply is settled.
                return

    def _serve_frames(self, conn):
        """Answer the whole frames buffered; False when ``conn`` was closed."""
        while conn.out is None and conn.lease is None:
            frame = conn.reader.next_frame()
            if frame is None:
                break
            if not self._serve(conn, *frame):
                self._fail(conn)
                return False
            if len(conn.reader):
                conn.deadline = time.monotonic() + self._timeout
        if not len(conn.reader) and conn.out is None and conn.lease is None:
            self._set_idle(conn, time.monotonic())
        return True

    def _refuse_frame(self, conn, reason):
        log.info("handoff_bad_frame", reason=reason, pid=conn.peer.pid)
        metrics.refusal_code(_INVALID_ARGUMENT)
        reply = handoff_pb2.HandoffReply(code=_INVALID_ARGUMENT, message=reason)
        payload = reply.SerializeToString()
        try:
            conn.sock.send(framing.HEADER.pack(len(payload)) + payload)
        except OSError:
            pass

    def _serve(self, conn, payload, fds):
        """Answer one request; return False to close the connection.

        Its time, from the frame read to the reply handed to the socket, is
        observed by operation (a check-out's settlement comes later).
        """
        started = time.perf_counter()
        request = self._known.get(payload)
        if request is not None:
            kind = request.kind
        else:
            try:
                message = handoff_pb2.HandoffRequest.FromString(payload)
            except DecodeError:
                framing.close_all(fds)
                self._refuse_frame(conn, "request is not a HandoffRequest")
                return False
            kind = message.WhichOneof("request")
            # The set field's message: validated by the request's handler.
            request = getattr(message, kind) if kind is not None else None
        if kind == "check_out" and not fds:
            served = self._check_out(conn, payload, request)
        else:
            served = self._answer(conn, payload, request, kind, fds)
        if kind is not None:
            metrics.handoff_duration(kind, time.perf_counter() - started)
        return served

    def _answer(self, conn, payload, request, kind, fds):
        """Answer a request other than a check-out; False to close.

        ``request`` is the message of the request's kind, or its _Request.
        """
        peer = conn.peer
        try:
            if kind == "check_in":
                reply = self._check_in(payload, request, fds, peer)
            else:
                framing.close_all(fds)
                if fds:
                    raise InvalidArgument(f"{kind}: carries no fd, got {len(fds)}")
                if kind == "save_final":
                    reply = self._save_final(request, peer)
                else:
                    raise InvalidArgument("request: none of check_out, check_in, "
                                          "save_final is set")
        except EpmError as e:
            log.info("handoff_refused", request=kind, code=e.code, reason=str(e),
                     pid=peer.pid)
            metrics.refusal(e)
            reply = handoff_pb2.HandoffReply(code=e.code, message=str(e))
        return self._send(conn, reply.SerializeToString())

    # -- writing replies ------------------------------------------------------

    def _send(self, conn, payload, fd=None, lease=None, hold=False):
        """Write a reply frame, with ``fd`` for the check-out ``lease``.

        ``hold`` says the lease is to be held by the peer once read.

        What the socket does not take waits for it to drain, and the
        connection reads nothing meanwhile. Returns False when the peer is
        gone (the lease, if any, released: its fd never left).
        """
        data = framing.HEADER.pack(len(payload)) + payload
        ancillary = []
        if fd is not None:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                          _FD.pack(fd))]
        try:
            sent = conn.sock.sendmsg([data], ancillary)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            log.info("handoff_reply_failed", reason=str(e), id=lease)
            if lease is not None:
                self._pool.release(lease)
            return False
        conn.lease, conn.hold = lease, hold
        if sent < len(data):
            conn.out = memoryview(data)[sent:]
            conn.out_fd = fd if sent == 0 else None
            conn.deadline = time.monotonic() + self._timeout
            self._watch(conn, _WRITING)
        elif lease is not None:
            conn.deadline = time.monotonic() + self._timeout
            self._sent(conn)
        return True

    def _sent(self, conn):
        """A check-out's whole reply is queued: let a check-in of the same
        enclave settle the lease if the client read it (not for a hold, whose
        enclave stays pooled, held by the client)."""
        if not conn.hold:
            conn.probe = functools.partial(delivery.probe, conn.sock)
            self._pool.sent(conn.lease, conn.probe)

    def _flush(self, conn):
        """Write more of a pending reply, now that the socket may take it."""
        ancillary = []
        if conn.out_fd is not None:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                          _FD.pack(conn.out_fd))]
        try:
            sent = conn.sock.sendmsg([conn.out], ancillary)
        except BlockingIOError:
            return
        except OSError as e:
            log.info("handoff_reply_failed", reason=str(e), id=conn.lease)
            self._fail(conn)
            return
        conn.out = conn.out[sent:]
        conn.out_fd = None
        if len(conn.out):
            return
        conn.out = None
        if conn.lease is not None:
            conn.deadline = time.monotonic() + self._timeout
            self._watch(conn, _READING)
            self._sent(conn)
        elif self._stopping.is_set():
            self._close(conn)
        else:
            self._watch(conn, _READING)
            if not self._serve_frames(conn):
                return
            self._read(conn)

    def _count_unconfirmed(self, entry_id):
        """Count a check-out whose fd may have left, its reply unconfirmed."""
        try:
            metrics.failed_handoff(self._pool.get(entry_id).subtype)
        except EpmError:
            pass  # gone meanwhile (flushed at shutdown): nothing to name

    def _watch(self, conn, mask):
        if conn.mask != mask:
            self._epoll.modify(conn.fileno, mask)
            conn.mask = mask

    def _check_delivery(self, conn):
        """Settle a check-out whose reply was sent; True when reading resumes.

        Unread is not untaken: a client can take the fd with MSG_PEEK (or a
        read of no bytes) and close with the message still queued, which
        looks like a client that died before reading. Either way the enclave
        may be in a client's hands, so it leaves the pool, and only a reply
        that was never sent gives it back.
        """
        outcome = delivery_state(conn.sock)
        if outcome is None:
            if time.monotonic() < conn.deadline:
                self._watch(conn, _DELIVERING)
                return False
            outcome = Delivery.UNKNOWN
        entry_id, conn.lease = conn.lease, None
        probe, conn.probe = conn.probe, None
        if outcome is Delivery.DISCARDED:
            self._count_unconfirmed(entry_id)
            if self._pool.hand_out(entry_id, probe):
                log.info("enclave_closed_unread", id=entry_id,
                         reason="the client closed without reading its reply")
            self._close(conn)
            return False
        if outcome is Delivery.UNKNOWN:
            self._count_unconfirmed(entry_id)
        if conn.hold:
            # Unknown counts as read here too: held, the enclave still goes
            # to no one else, and the reaper discards it if the client dies.
            peer = conn.peer
            self._pool.hold(entry_id, Owner(pid=peer.pid, uid=peer.uid))
            self._reaper.watch(entry_id, peer.pid)
        elif not self._pool.hand_out(entry_id, probe):
            log.debug("enclave_handed_out_at_check_in", id=entry_id)
        if outcome is Delivery.UNKNOWN:
            log.info("enclave_delivery_unconfirmed", id=entry_id)
            self._close(conn)
            return False
        log.debug("enclave_checked_out", id=entry_id)
        if self._stopping.is_set():
            self._close(conn)
            return False
        self._watch(conn, _READING)
        return self._serve_frames(conn)

    # -- requests -------------------------------------------------------------

    def _check_in(self, payload, msg, fds, peer):
        """Validate and pool the one fd of a check-in; closes it on failure.

        The entry is held by ``peer``, its pid watched, or with ``available``
        saved final at once.
        """
        try:
            if len(fds) != 1:
                raise InvalidArgument(
                    f"check_in: expected exactly one fd, got {len(fds)}")
            request = self._validated(payload, "check_in", msg)
            fdcheck.check_enclave_fd(fds[0], request.identity)
            entry_id = self._pool.check_in(
                request.subtype, request.identity, request.layout, fds[0],
                Owner(pid=peer.pid, uid=peer.uid), available=request.flag)
        except BaseException:
            framing.close_all(fds)
            raise
        if not request.flag:
            self._reaper.watch(entry_id, peer.pid)
        return handoff_pb2.HandoffReply(code=_OK, id=entry_id)

    def _save_final(self, msg, peer):
        # Checked as the gRPC path checks an ID: a reply quotes no raw bytes.
        validate_id(msg.id, "save_final.id")
        self._pool.save_final(msg.id, uid=peer.uid, discard=msg.discard)
        return handoff_pb2.HandoffReply(code=_OK, id=msg.id)

    def _check_out(self, conn, payload, msg):
        try:
            request = self._validated(payload, "check_out", msg)
        except EpmError as e:
            metrics.refusal(e)
            reply = handoff_pb2.HandoffReply(code=e.code, message=str(e))
            return self._send(conn, reply.SerializeToString())
        entry = self._pool.lease(request.subtype, request.identity)
        if entry is None:
            return self._send(conn, _NO_ENCLAVE)
        reply = (handoff_pb2.HandoffReply(code=_OK, id=entry.id).SerializeToString()
                 + self._enclave_reply(entry))
        return self._send(conn, reply, fd=entry.fd, lease=entry.id,
                          hold=request.flag)

    def _validated(self, payload, kind, msg):
        """The _Request of a check-in or check-out; raises InvalidArgument.

        ``msg`` is the request's CheckIn or CheckOut, or its _Request when
        the same bytes passed before. Validation depends on the bytes alone,
        so its result is kept by them.
        """
        if isinstance(msg, _Request):
            return msg
        subtype = subtype_from_request(msg.subtype, f"{kind}.subtype")
        if kind == "check_out":
            if not msg.HasField("identity"):
                raise InvalidArgument("check_out.identity: required")
            identity = identity_from_proto(msg.identity, "check_out.identity")
            request = _Request(kind, subtype, identity, None, msg.hold)
        else:
            if not msg.enclave.HasField("identity"):
                raise InvalidArgument("check_in.enclave.identity: required")
            identity = identity_from_proto(msg.enclave.identity,
                                           "check_in.enclave.identity")
            layout = layout_from_proto(msg.enclave, "check_in.enclave")
            check_layout_fits(layout, identity.size, "check_in.enclave.layout")
            request = _Request(kind, subtype, identity, layout, msg.available)
        if len(self._known) >= _KNOWN_REQUESTS:
            self._known.clear()
        self._known[payload] = request
        return request

    def _enclave_reply(self, entry):
        # Protobuf merges concatenated messages, so the enclave's part is
        # serialized once per layout and identity, not once per check-out.
        key = (entry.layout, entry.identity)
        got = self._enclave_replies.get(key)
        if got is None:
            if len(self._enclave_replies) >= 64:
                self._enclave_replies.clear()
            got = handoff_pb2.HandoffReply(
                enclave=enclave_proto(entry.layout, entry.identity)
            ).SerializeToString()
            self._enclave_replies[key] = got
        return got
