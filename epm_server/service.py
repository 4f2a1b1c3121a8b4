"""The gRPC servicer: a thin adapter from ``v1alpha1`` requests to the core.

Requests are validated here, the enclave pool, the legacy hand-off and the
bundle caches do the work, and ``_STATUS`` is the one place where our errors
become gRPC status codes.
"""

import concurrent.futures
import functools
import os
import time

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc
from epm_server import metrics
from epm_server.bundle import BUNDLE_TYPES
from epm_server.enclave import enclave_proto
from epm_server.errors import EpmError, InvalidArgument, NotFound, shown
from epm_server.ids import validate_id
from epm_server.pool import State

log = structlog.get_logger(__name__)

ENCLAVE_POOL = "enclave-cache-pool"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EnclavePoolManager"].full_name
BUNDLE_POOLS = frozenset(BUNDLE_TYPES)
PICK_FILTERS = ("mrenclave", "mrsigner", "backend", "size")
# A legacy check-out must have sent its fd before the client's deadline: the
# published client gives each call 1 s, and the reply still has to travel.
_REPLY_MARGIN = 0.1

# Connections on the gRPC socket at once; grpc-core closes any past it as it
# accepts them (GRPC_ARG_MAX_ALLOWED_INCOMING_CONNECTIONS), so a flood of idle
# connections costs the daemon this many fds, no more. Published clients open
# one connection per call and close it.
MAX_CONNECTIONS = 256
# Seconds a new connection may take to send its HTTP/2 preface: one that
# never does gives its slot back after this.
HANDSHAKE_TIMEOUT = 5.0

# Our error codes are gRPC status numbers; this maps them to grpc's enum.
_STATUS = {status.value[0]: status for status in grpc.StatusCode}


def adapt(method):
    """Turn an error raised by ``method`` into an aborted gRPC call.

    An EpmError keeps its code; anything else is a bug of ours, logged once
    here as ``rpc_failed`` and answered INTERNAL, rather than the UNKNOWN
    grpc would send with no trace in the log.
    """
    @functools.wraps(method)
    def call(self, request, context):
        try:
            return method(self, request, context)
        except EpmError as e:
            metrics.refusal(e)
            context.abort(_STATUS[e.code], str(e))
        except Exception as e:
            log.exception("rpc_failed", method=method.__name__)
            context.abort(grpc.StatusCode.INTERNAL,
                          f"{method.__name__}: internal error "
                          f"({type(e).__name__}); see the daemon's log")
    return call


def _is_bundle(pool_type, field="type"):
    """True for a bundle cache type, False for the enclave pool.

    Raises InvalidArgument for any other type.
    """
    if pool_type == ENCLAVE_POOL:
        return False
    if pool_type in BUNDLE_POOLS:
        return True
    raise InvalidArgument(f"{field}: unknown pool type {shown(pool_type, quoted=True)}; known: "
                          f"{ENCLAVE_POOL}, {', '.join(BUNDLE_TYPES)}")


def cache_of(entry):
    """The ``Cache`` message listing a pool entry (its fd shown as -1)."""
    if entry.identity is not None:
        size = entry.identity.size
    else:
        size = sum(item.size for item in entry.layout)
    cache = pb.Cache(type=ENCLAVE_POOL, subType=entry.subtype, ID=entry.id,
                     size=size, created=entry.created)
    cache.options.Pack(enclave_proto(entry.layout, entry.identity,
                                     state=entry.state.value))
    return cache


def _matches(entry, filters):
    identity = entry.identity
    for key, value in filters.items():
        if identity is None:
            return False
        if key == "size":
            found = str(identity.size)
        elif key == "backend":
            found = identity.backend
        else:
            found = getattr(identity, key).hex()
        if found != value.lower():
            return False
    return True


def bundle_cache_of(bundles, record):
    """The ``Cache`` message of a bundle cache, its parent chain included."""
    chain = [record, *bundles.ancestors(record)]
    cache = None
    for item in reversed(chain):
        node = pb.Cache(type=item.type, subType=item.subtype, ID=item.id,
                        savePath=bundles.save_path(item), size=item.size,
                        created=item.created)
        if cache is not None:
            node.parent.CopyFrom(cache)
        cache = node
    return cache


class EnclavePoolService(pb_grpc.EnclavePoolManagerServicer):
    """All eight ``v1alpha1.EnclavePoolManager`` methods over every pool type."""

    def __init__(self, pool, legacy, bundles):
        self._pool = pool
        self._legacy = legacy
        self._bundles = bundles

    @adapt
    def Healthz(self, request, context):
        if request.type:
            _is_bundle(request.type)
        return pb.HealthzResponse(ok=True)

    @adapt
    def ListCache(self, request, context):
        bundle = _is_bundle(request.type)
        if request.limit < 0:
            raise InvalidArgument(f"limit: must not be negative, got {request.limit}")
        if bundle:
            records = self._bundles.list(request.type, request.subType,
                                         request.lastCacheID, request.limit)
            return pb.ListCacheResponse(caches=[
                bundle_cache_of(self._bundles, r) for r in records])
        entries = self._pool.entries(subtype=request.subType,
                                     after=request.lastCacheID, limit=request.limit)
        return pb.ListCacheResponse(caches=[cache_of(e) for e in entries])

    @adapt
    def PickCache(self, request, context):
        if _is_bundle(request.type):
            records = self._bundles.pick(request.type, request.subType,
                                         dict(request.filters))
            return pb.PickCacheResponse(caches=[
                bundle_cache_of(self._bundles, r) for r in records])
        unknown = sorted(set(request.filters) - set(PICK_FILTERS))
        if unknown:
            raise InvalidArgument(f"filters: unknown key {shown(unknown[0], quoted=True)}; known: "
                                  f"{', '.join(PICK_FILTERS)}")
        entries = self._pool.entries(subtype=request.subType,
                                     states={State.AVAILABLE})
        return pb.PickCacheResponse(caches=[
            cache_of(e) for e in entries if _matches(e, request.filters)])

    @adapt
    def DeleteCache(self, request, context):
        if _is_bundle(request.type):
            self._bundles.delete(request.type, request.subType, request.ID)
            return pb.DeleteCacheResponse(ok=True)
        if not request.ID:
            raise InvalidArgument("ID: must not be empty")
        self._pool.delete(request.ID, subtype=request.subType)
        return pb.DeleteCacheResponse(ok=True)

    @adapt
    def LoadCache(self, request, context):
        if _is_bundle(request.type):
            self._bundles.load(request.type, request.subType, request.ID,
                               request.targetPath)
            return pb.LoadCacheResponse(ok=True)
        raise InvalidArgument("LoadCache: does not apply to the enclave pool "
                              "(its enclaves are fds, not files to load)")

    @adapt
    def SaveCache(self, request, context):
        cache = _cache_of_request(request)
        if _is_bundle(cache.type, "cache.type"):
            parent = None
            if cache.HasField("parent"):
                _is_bundle(cache.parent.type, "cache.parent.type")
                if cache.parent.type == ENCLAVE_POOL:
                    raise InvalidArgument("cache.parent.type: a bundle cache's "
                                          "parent must be a bundle cache")
                parent = (cache.parent.type, cache.parent.ID)
            self._bundles.save(cache.type, cache.subType, cache.ID, parent,
                               request.sourcePath)
            return pb.SaveCacheResponse(ok=True)
        self._legacy.save_cache(cache.ID, cache.subType, cache.options)
        return pb.SaveCacheResponse(ok=True)

    @adapt
    def SaveFinalCache(self, request, context):
        cache = _cache_of_request(request)
        if _is_bundle(cache.type, "cache.type"):
            # A bundle save is complete when SaveCache answers; this only
            # confirms that the cache exists.
            self._bundles.get(cache.type, cache.subType, cache.ID)
            return pb.SaveCacheResponse(ok=True)
        validate_id(cache.ID)
        try:
            if (cache.subType
                    and self._pool.get(cache.ID).subtype != cache.subType):
                raise InvalidArgument(
                    f"subType: enclave {cache.ID} is not of subtype "
                    f"{shown(cache.subType, quoted=True)}")
            self._pool.save_final(cache.ID, legacy=True)
        except NotFound as e:
            reason = self._legacy.refusal(cache.ID)
            if reason is None:
                raise
            raise NotFound(f"{e}: its check-in was dropped when its fd was "
                           f"due: {reason}") from None
        return pb.SaveCacheResponse(ok=True)

    @adapt
    def GetCache(self, request, context):
        if _is_bundle(request.type):
            record = self._bundles.get(request.type, request.subType, request.ID)
            return pb.GetCacheResponse(cache=bundle_cache_of(self._bundles, record))
        remaining = context.time_remaining()
        budget = None if remaining is None else remaining - _REPLY_MARGIN
        entry = self._legacy.get_cache(request.ID, request.subType, budget)
        if entry is None:
            return pb.GetCacheResponse()
        cache = cache_of(entry)
        # Published clients read the fd number the daemon had; the fd itself
        # went over the legacy socket.
        cache.options.Pack(enclave_proto(entry.layout, entry.identity, fd=entry.fd,
                                         state=State.HANDED_OUT.value))
        return pb.GetCacheResponse(cache=cache)


def _cache_of_request(request):
    # The published daemon dereferenced a missing cache and crashed.
    if not request.HasField("cache"):
        raise InvalidArgument("cache: missing; the request names no cache")
    return request.cache


class RpcTimer(grpc.ServerInterceptor):
    """Times every unary gRPC call by method into ``epm_rpc_duration_seconds``.

    Streaming calls (health Watch, reflection) are passed through: their
    length is the client's, not the daemon's.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        behaviour = handler.unary_unary

        def timed(request, context):
            start = time.perf_counter()
            try:
                return behaviour(request, context)
            finally:
                metrics.rpc_duration(method, time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            timed, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class Server:
    """A started gRPC server and the health status it reports."""

    def __init__(self, server, health_servicer):
        self._server = server
        self._health = health_servicer

    def start_shutdown(self):
        """Report NOT_SERVING for every service from now on."""
        self._health.enter_graceful_shutdown()

    def stop(self, grace):
        """Refuse new calls, let calls in flight run ``grace`` seconds.

        Returns an event set when the server has stopped.
        """
        self.start_shutdown()
        return self._server.stop(grace)


def serve(service, path, max_recv, max_send, uid=None, gid=None, workers=8,
          extra=(), interceptors=(), max_connections=MAX_CONNECTIONS,
          handshake_timeout=HANDSHAKE_TIMEOUT):
    """Start a gRPC server for ``service`` on the Unix socket ``path``.

    Besides ``v1alpha1.EnclavePoolManager`` it serves ``grpc.health.v1``
    (SERVING for "" and each service until shutdown starts) and server
    reflection. ``extra`` holds (add_to_server function, servicer, service
    name) for more services. At most ``max_connections`` connections are
    served at once; one that has not completed its HTTP/2 handshake within
    ``handshake_timeout`` seconds is closed. Returns a started Server.
    Raises OSError when the socket cannot be bound.
    """
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                              thread_name_prefix="grpc"),
        interceptors=list(interceptors),
        options=[("grpc.max_receive_message_length", max_recv),
                 ("grpc.max_send_message_length", max_send),
                 ("grpc.max_allowed_incoming_connections", max_connections),
                 ("grpc.server_handshake_timeout_ms",
                  int(handshake_timeout * 1000))])
    pb_grpc.add_EnclavePoolManagerServicer_to_server(service, server)
    names = [SERVICE_NAME]
    for add, servicer, name in extra:
        add(servicer, server)
        names.append(name)
    # Non-blocking: a Watch stream holds no worker thread while it waits.
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    # grpc creates the socket itself: the umask keeps it 0660 from its first
    # moment, before the chmod that states it.
    old_umask = os.umask(0o117)
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old_umask)
    if not bound:
        raise OSError(f"cannot bind the gRPC socket {path}")
    server.start()
    os.chmod(path, 0o660)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    return Server(server, health_servicer)
