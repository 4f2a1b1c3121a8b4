"""The epm client: check enclaves out and in, and administer the pools.

Check-out, check-in and save-final travel on the daemon's hand-off socket,
one round trip each, with the enclave fd in SCM_RIGHTS (DESIGN.md section 3,
"Our hand-off"). Listing, deleting and health checks use the gRPC API, and
only they import grpc and its stubs: the PAL checks enclaves out in a process
that starts for every container, where importing grpc alone would cost about
90 ms and its threads would be inherited by a forked workload.
"""

import dataclasses
import os
import socket
import time

from epm_api import framing
from epm_api import handoff_pb2 as hpb
from epm_api import v1alpha1_pb2 as pb
from epm_client import errors
from epm_client.types import (ENCLAVE_POOL, Identity, LayoutEntry,
                              enclave_to_proto)

DEFAULT_SOCKET = "/var/run/epm/epm.sock"
HANDOFF_SOCKET_NAME = "epm-handoff.sock"

# A local daemon answers in microseconds; these bound a stuck or dead one.
CONNECT_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 5.0
RPC_TIMEOUT_S = 5.0


def default_socket():
    """The daemon's gRPC socket: $EPM_SOCKET, or the system default."""
    return os.environ.get("EPM_SOCKET") or DEFAULT_SOCKET


@dataclasses.dataclass
class CheckedOut:
    """An enclave checked out of the pool; the caller owns ``fd``."""

    fd: int
    layout: list
    identity: Identity
    pool_id: str


@dataclasses.dataclass(frozen=True)
class PoolEntry:
    """One entry of a pool, as ListCache reports it."""

    type: str
    subtype: str
    id: str
    state: str
    created: int
    layout: tuple
    identity: Identity | None


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

    # -- the hand-off socket ------------------------------------------------

    def check_out(self, subtype, identity):
        """Take an available enclave of ``subtype`` and ``identity``.

        Returns a CheckedOut, or None when the pool has no such enclave.
        Raises DaemonUnavailable when the daemon cannot be reached, and the
        EpmError subclass of the daemon's refusal otherwise.
        """
        request = hpb.HandoffRequest(check_out=hpb.CheckOut(
            subtype=subtype, identity=identity.to_proto()))
        reply, fds = self._round_trip(request)
        if not reply.HasField("enclave"):
            framing.close_all(fds)
            return None
        if len(fds) != 1:
            framing.close_all(fds)
            raise errors.ProtocolError(
                f"check-out reply carried {len(fds)} descriptors, expected 1")
        got = Identity.from_proto(reply.enclave.identity)
        if got != identity:
            framing.close_all(fds)
            raise errors.ProtocolError(
                f"daemon handed out enclave {reply.id} of another identity")
        layout = [LayoutEntry.from_proto(e) for e in reply.enclave.layout]
        return CheckedOut(fd=fds[0], layout=layout, identity=got, pool_id=reply.id)

    def check_in(self, fd, subtype, layout, identity):
        """Hand ``fd`` to the pool, held for this process; return its ID.

        The caller keeps its own copy of ``fd`` and may go on using the
        enclave; ``save_final`` makes it available to others.
        """
        request = hpb.HandoffRequest(check_in=hpb.CheckIn(
            subtype=subtype, enclave=enclave_to_proto(layout, identity)))
        reply, fds = self._round_trip(request, fd=fd)
        framing.close_all(fds)
        if not reply.id:
            raise errors.ProtocolError("check-in reply carried no ID")
        return reply.id

    def save_final(self, pool_id):
        """Make the held enclave ``pool_id`` available for check-out."""
        request = hpb.HandoffRequest(save_final=hpb.SaveFinal(id=pool_id))
        _, fds = self._round_trip(request)
        framing.close_all(fds)

    def _round_trip(self, request, fd=None):
        conn = self._connect()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        try:
            framing.send_frame(conn, request.SerializeToString(), deadline, fd)
            got = framing.recv_frame(conn, deadline)
        except (OSError, framing.FramingError) as e:
            self._drop_connection()
            raise errors.DaemonUnavailable(
                f"hand-off with epm at {self.handoff_path} failed: {e}") from e
        if got is None:
            self._drop_connection()
            raise errors.DaemonUnavailable(
                f"epm at {self.handoff_path} closed the connection")
        payload, fds = got
        reply = hpb.HandoffReply()
        try:
            reply.ParseFromString(payload)
        except Exception as e:
            framing.close_all(fds)
            self._drop_connection()
            raise errors.ProtocolError(f"unparseable hand-off reply: {e}") from e
        if reply.code != 0:
            framing.close_all(fds)
            raise errors.from_code(reply.code, reply.message)
        return reply, fds

    def _connect(self):
        if self._conn is not None:
            return self._conn
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        conn.settimeout(CONNECT_TIMEOUT_S)
        try:
            conn.connect(self.handoff_path)
        except OSError as e:
            conn.close()
            raise errors.DaemonUnavailable(
                f"cannot reach epm at {self.handoff_path}: {e.strerror or e}"
            ) from e
        self._conn = conn
        return conn

    def _drop_connection(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the gRPC API ---------------------------------------------------------

    def health(self):
        """True when the daemon answers Healthz with ok."""
        return self._call("Healthz", pb.HealthzRequest(type=ENCLAVE_POOL)).ok

    def list(self, subtype="", pool_type=ENCLAVE_POOL, page=500):
        """Every entry of ``pool_type`` (optionally of one subtype), by ID."""
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
        if not os.path.exists(self.socket_path):
            raise errors.DaemonUnavailable(f"no epm socket at {self.socket_path}")
        import grpc
        from epm_api import v1alpha1_pb2_grpc as pb_grpc
        if self._stub is None:
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
    enclave = pb.Enclave()
    identity = None
    layout = ()
    if cache.HasField("options") and cache.options.Unpack(enclave):
        layout = tuple(LayoutEntry.from_proto(e) for e in enclave.layout)
        if enclave.HasField("identity"):
            identity = Identity.from_proto(enclave.identity)
    return PoolEntry(type=cache.type, subtype=cache.subType, id=cache.ID,
                     state=enclave.state, created=cache.created, layout=layout,
                     identity=identity)
