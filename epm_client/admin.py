"""Administration calls for epmctl: health, pool statistics, pre-warm
targets, bundle caches.

They go over the daemon's gRPC socket: ``grpc.health.v1``, our own
``epm.admin.v1.Admin`` (``proto/epm_api/admin.proto``) and, for bundle
caches, ``v1alpha1``'s ListCache. Failures raise the same exceptions as
``epm_client.Client``.
"""

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epm_api import admin_pb2, admin_pb2_grpc, v1alpha1_pb2, v1alpha1_pb2_grpc
from epm_client import errors
from epm_client.client import RPC_TIMEOUT_S, default_socket, probe_socket

SERVING = "SERVING"


class AdminClient:
    """A gRPC channel to one daemon's administration services."""

    def __init__(self, socket_path=None):
        self.socket_path = str(socket_path or default_socket())
        self._channel = None

    def health(self, service=""):
        """The daemon's health status name (SERVING, NOT_SERVING, ...).

        Raises DaemonUnavailable when nothing answers.
        """
        stub = health_pb2_grpc.HealthStub(self._connect())
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(
            service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def stats(self):
        """The ``GetStatsResponse``: per-subtype states, hits and misses."""
        stub = admin_pb2_grpc.AdminStub(self._connect())
        return self._call(stub.GetStats, admin_pb2.GetStatsRequest())

    def prewarm(self):
        """The pre-warmed pools: a list of ``PrewarmPool`` messages."""
        stub = admin_pb2_grpc.AdminStub(self._connect())
        return list(self._call(stub.GetPrewarm,
                               admin_pb2.GetPrewarmRequest()).pools)

    def set_prewarm(self, subtype, count):
        """Set ``subtype``'s target to ``count``; return the pools as above."""
        stub = admin_pb2_grpc.AdminStub(self._connect())
        return list(self._call(stub.SetPrewarm, admin_pb2.SetPrewarmRequest(
            subtype=subtype, count=count)).pools)

    def flush(self, subtype=""):
        """Close every available enclave (of ``subtype``); return (deleted, kept)."""
        stub = admin_pb2_grpc.AdminStub(self._connect())
        reply = self._call(stub.Flush, admin_pb2.FlushRequest(subtype=subtype))
        return reply.deleted, reply.kept

    def caches(self, pool_type, subtype="", page=500):
        """Every bundle cache of ``pool_type`` (of ``subtype`` when given), by
        ID: ``v1alpha1.Cache`` messages, with their size, parent and path.

        ``Client.list`` reports enclaves, and a cache is none.
        """
        stub = v1alpha1_pb2_grpc.EnclavePoolManagerStub(self._connect())
        caches, last = [], ""
        while True:
            reply = self._call(stub.ListCache, v1alpha1_pb2.ListCacheRequest(
                type=pool_type, subType=subtype, lastCacheID=last, limit=page))
            caches.extend(reply.caches)
            if len(reply.caches) < page:
                return caches
            last = reply.caches[-1].ID

    def close(self):
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _connect(self):
        if self._channel is None:
            probe_socket(self.socket_path)
            self._channel = grpc.insecure_channel(f"unix:{self.socket_path}")
        return self._channel

    def _call(self, method, request):
        try:
            return method(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
