"""Our hand-off socket (DESIGN section 3): check-in, save final, check-out.

Each connection gets a thread and may carry many requests. Every frame read
and write is bounded by ``timeout``, the wait between requests by
``idle_timeout``, and the number of connections by ``max_connections``, so a
slow or hostile client costs one bounded thread and never stalls another.
Connections are shared fairly: one uid holds at most ``max_per_uid`` of
them, and a newcomer past either limit takes the place of the connection
idle the longest (one waiting between requests, never one mid-frame).
The pool's lock is never held across socket I/O: a check-out leases the
entry, sends the fd unlocked, then hands it out or releases it.
"""

import dataclasses
import select
import socket
import threading
import time

import structlog
from google.protobuf.message import DecodeError

from epm_api import framing
from epm_api import handoff_pb2
from epm_server import fdcheck
from epm_server.delivery import Delivery, wait_delivery
from epm_server.enclave import (
    check_layout_fits, enclave_proto, identity_from_proto, layout_from_proto,
    subtype_from_request)
from epm_server.errors import EpmError, InvalidArgument, PermissionDenied
from epm_server.peers import peer_of
from epm_server.pool import Owner
from epm_server.sockets import listen_unix, unlink_socket

log = structlog.get_logger(__name__)

_OK = 0
_INVALID_ARGUMENT = InvalidArgument.code
_RESOURCE_EXHAUSTED = 8
# A refusal is written to a peer we are about to drop: do not wait long.
_REFUSAL_TIMEOUT = 0.5
# Seconds to wait before accepting again after accept() failed (EMFILE).
_ACCEPT_BACKOFF = 0.1


@dataclasses.dataclass
class _Connection:
    """A served connection; ``idle_since`` is set while it waits for a request."""

    peer: object
    thread: threading.Thread
    idle_since: float | None = None
    evicted: bool = False


class HandoffServer:
    """Serves the hand-off protocol on a Unix socket, one thread per connection."""

    def __init__(self, pool, reaper, path, policy, timeout, idle_timeout,
                 uid=None, gid=None, max_connections=64, max_per_uid=16):
        self._pool = pool
        self._reaper = reaper
        self.path = path
        self._policy = policy
        self._timeout = timeout
        self._idle_timeout = idle_timeout
        self._uid, self._gid = uid, gid
        self._max_connections = max_connections
        self._max_per_uid = max_per_uid
        self._lock = threading.Lock()
        # socket -> _Connection; an evicted connection leaves at once, so its
        # slot is free while its thread winds down.
        self._connections = {}
        self._listener = None
        self._acceptor = None
        self._stopping = threading.Event()

    def start(self):
        """Listen on the socket path and start accepting. Raises OSError."""
        self._listener = listen_unix(self.path, self._uid, self._gid)
        self._acceptor = threading.Thread(target=self._accept_loop,
                                          name="handoff-accept", daemon=True)
        self._acceptor.start()

    def stop(self):
        """Stop accepting, let requests in flight finish, remove the socket.

        Idle connections are woken by shutting their read side, so each thread
        ends after the reply it may be writing.
        """
        if self._listener is None:
            return
        self._stopping.set()
        unlink_socket(self.path)
        # shutdown() wakes a thread blocked in accept(); close() alone does not.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._acceptor.join()
        self._listener.close()
        self._listener = None
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        for record in connections.values():
            record.thread.join(self._timeout * 2 + 1)

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return  # the listener was shut down by stop()
                # Out of descriptors or memory: the connection waits in the
                # backlog; accepting must go on once some are freed.
                log.warning("handoff_accept_failed", reason=str(e))
                self._stopping.wait(_ACCEPT_BACKOFF)
                continue
            try:
                self._admit(conn)
            except Exception:
                # One bad connection (peer gone, no thread to spare) must not
                # end the accept loop and with it the daemon's service.
                log.exception("handoff_admit_failed")
                conn.close()

    def _admit(self, conn):
        peer = peer_of(conn)
        if not self._policy.allows(peer):
            log.warning("handoff_peer_refused", pid=peer.pid, uid=peer.uid,
                        gid=peer.gid)
            self._refuse(conn, PermissionDenied.code,
                         f"uid {peer.uid} may not use the enclave pool")
            return
        thread = threading.Thread(target=self._serve, args=(conn, peer),
                                  name=f"handoff-{peer.pid}", daemon=True)
        with self._lock:
            refusal = self._make_room(peer)
            if refusal is None:
                self._connections[conn] = _Connection(peer, thread,
                                                      time.monotonic())
        if refusal is not None:
            log.warning("handoff_connections_exhausted", pid=peer.pid,
                        uid=peer.uid, reason=refusal)
            self._refuse(conn, _RESOURCE_EXHAUSTED, refusal)
            return
        try:
            thread.start()
        except BaseException:
            with self._lock:
                del self._connections[conn]
            raise

    def _make_room(self, peer):
        """Evict one idle connection if ``peer`` has no room; return a refusal.

        Past the per-uid share, the peer's own longest-idle connection goes;
        with the table full, the longest-idle of all. Called with the lock
        held; returns None when there is room, else why there is none.
        """
        mine = [(c, r) for c, r in self._connections.items()
                if r.peer.uid == peer.uid]
        if len(mine) >= self._max_per_uid:
            if self._evict_idlest(mine):
                return None
            return (f"uid {peer.uid} has {len(mine)} connections busy, "
                    f"at most {self._max_per_uid}")
        if len(self._connections) >= self._max_connections:
            if self._evict_idlest(self._connections.items()):
                return None
            return f"too many connections: {len(self._connections)} busy"
        return None

    def _evict_idlest(self, candidates):
        idle = [(r.idle_since, c, r) for c, r in candidates
                if r.idle_since is not None]
        if not idle:
            return False
        since, conn, record = min(idle, key=lambda item: item[0])
        record.evicted = True
        del self._connections[conn]
        # Wakes the thread's wait for a request; it sees the flag and closes.
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        log.info("handoff_connection_evicted", pid=record.peer.pid,
                 uid=record.peer.uid, idle_s=round(time.monotonic() - since, 3))
        return True

    def _refuse(self, conn, code, message):
        reply = handoff_pb2.HandoffReply(code=code, message=message)
        try:
            framing.send_frame(conn, reply.SerializeToString(),
                               time.monotonic() + _REFUSAL_TIMEOUT)
        except (framing.FramingError, OSError):
            pass
        conn.close()

    def _serve(self, conn, peer):
        log.debug("handoff_connected", pid=peer.pid, uid=peer.uid)
        try:
            while self._serve_one(conn, peer):
                pass
        except Exception:
            log.exception("handoff_connection_failed", pid=peer.pid)
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()
            log.debug("handoff_disconnected", pid=peer.pid)

    def _serve_one(self, conn, peer):
        """Read and answer one request; return False to close the connection."""
        if not self._wait_request(conn):
            # No reply: a client idle for long would read it as the answer to
            # its next request. It sees the close and reconnects.
            return False
        try:
            frame = framing.recv_frame(conn, time.monotonic() + self._timeout)
        except framing.FrameTimeout:
            # No reply: a client idle for long would read it as the answer to
            # its next request. It sees the close and reconnects.
            return False
        except framing.FramingError as e:
            self._refuse_frame(conn, peer, str(e))
            return False
        except OSError:
            return False
        if frame is None:
            return False
        payload, fds = frame
        try:
            request = handoff_pb2.HandoffRequest.FromString(payload)
        except DecodeError:
            framing.close_all(fds)
            self._refuse_frame(conn, peer, "request is not a HandoffRequest")
            return False
        kind = request.WhichOneof("request")
        if kind == "check_out" and not fds:
            return self._check_out(conn, request.check_out)
        try:
            if kind == "check_in":
                reply = self._check_in(request.check_in, fds, peer)
            else:
                framing.close_all(fds)
                if fds:
                    raise InvalidArgument(f"{kind}: carries no fd, got {len(fds)}")
                if kind == "save_final":
                    reply = self._save_final(request.save_final, peer)
                else:
                    raise InvalidArgument("request: none of check_out, check_in, "
                                          "save_final is set")
        except EpmError as e:
            log.info("handoff_refused", request=kind, code=e.code, reason=str(e),
                     pid=peer.pid)
            reply = handoff_pb2.HandoffReply(code=e.code, message=str(e))
        return self._send(conn, reply)

    def _wait_request(self, conn):
        """Wait idle for a request's first byte; False when timed out or evicted.

        While waiting the connection may be evicted for a newcomer; once a
        byte came it is busy and stays until its request is answered.
        """
        with self._lock:
            record = self._connections.get(conn)
            if record is None:
                return False
            record.idle_since = time.monotonic()
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        ready = poller.poll(self._idle_timeout * 1000)
        with self._lock:
            record.idle_since = None
            return bool(ready) and not record.evicted

    def _refuse_frame(self, conn, peer, reason):
        log.info("handoff_bad_frame", reason=reason, pid=peer.pid)
        reply = handoff_pb2.HandoffReply(code=_INVALID_ARGUMENT, message=reason)
        try:
            framing.send_frame(conn, reply.SerializeToString(),
                               time.monotonic() + _REFUSAL_TIMEOUT)
        except (framing.FramingError, OSError):
            pass

    def _send(self, conn, reply, fd=None):
        try:
            framing.send_frame(conn, reply.SerializeToString(),
                               time.monotonic() + self._timeout, fd=fd)
        except (framing.FramingError, OSError) as e:
            log.info("handoff_reply_failed", reason=str(e))
            return False
        return True

    def _check_in(self, msg, fds, peer):
        """Validate and pool the one fd of a check-in; closes it on failure."""
        try:
            if len(fds) != 1:
                raise InvalidArgument(
                    f"check_in: expected exactly one fd, got {len(fds)}")
            subtype = subtype_from_request(msg.subtype, "check_in.subtype")
            if not msg.enclave.HasField("identity"):
                raise InvalidArgument("check_in.enclave.identity: required")
            identity = identity_from_proto(msg.enclave.identity,
                                           "check_in.enclave.identity")
            layout = layout_from_proto(msg.enclave, "check_in.enclave")
            check_layout_fits(layout, identity.size, "check_in.enclave.layout")
            fdcheck.check_enclave_fd(fds[0], identity)
            entry_id = self._pool.check_in(subtype, identity, layout, fds[0],
                                           Owner(pid=peer.pid, uid=peer.uid))
        except BaseException:
            framing.close_all(fds)
            raise
        self._reaper.watch(entry_id, peer.pid)
        return handoff_pb2.HandoffReply(code=_OK, id=entry_id)

    def _save_final(self, msg, peer):
        self._pool.save_final(msg.id, uid=peer.uid)
        return handoff_pb2.HandoffReply(code=_OK, id=msg.id)

    def _check_out(self, conn, msg):
        try:
            subtype = subtype_from_request(msg.subtype, "check_out.subtype")
            if not msg.HasField("identity"):
                raise InvalidArgument("check_out.identity: required")
            identity = identity_from_proto(msg.identity, "check_out.identity")
        except EpmError as e:
            return self._send(conn, handoff_pb2.HandoffReply(code=e.code,
                                                             message=str(e)))
        entry = self._pool.lease(subtype, identity)
        if entry is None:
            return self._send(conn, handoff_pb2.HandoffReply(code=_OK))
        reply = handoff_pb2.HandoffReply(
            code=_OK, id=entry.id,
            enclave=enclave_proto(entry.layout, entry.identity))
        try:
            framing.send_frame(conn, reply.SerializeToString(),
                               time.monotonic() + self._timeout, fd=entry.fd)
        except (framing.FramingError, OSError) as e:
            log.info("handoff_reply_failed", reason=str(e), id=entry.id)
            if getattr(e, "fd_sent", False):
                # The peer may hold the fd: it must never go to another.
                self._pool.hand_out(entry.id)
            else:
                self._pool.release(entry.id)
            return False
        # Queued is not received: a client that dies before reading leaves
        # the fd for the kernel to close, and the enclave is still ours.
        outcome = wait_delivery(conn, time.monotonic() + self._timeout)
        if outcome is Delivery.DISCARDED:
            self._pool.release(entry.id)
            log.info("enclave_returned", id=entry.id, reason="client closed unread")
            return False
        self._pool.hand_out(entry.id)
        if outcome is Delivery.UNKNOWN:
            log.info("enclave_delivery_unconfirmed", id=entry.id)
            return False
        log.debug("enclave_checked_out", id=entry.id, subtype=subtype)
        return True
