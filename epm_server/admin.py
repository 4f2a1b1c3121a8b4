"""The ``epm.admin.v1.Admin`` servicer: pool statistics and pre-warm targets.

Our own API (``proto/epm_api/admin.proto``), served on the gRPC socket beside
``v1alpha1``; errors map to status codes as in ``service.py``.
"""

from epm_api import admin_pb2 as pb
from epm_api import admin_pb2_grpc as pb_grpc
from epm_server import metrics
from epm_server.enclave import subtype_from_request
from epm_server.service import adapt

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name


class AdminService(pb_grpc.AdminServicer):
    """Reads the pool and the metrics; changes the pre-warmer's targets."""

    def __init__(self, pool, prewarmer):
        self._pool = pool
        self._prewarmer = prewarmer

    @adapt
    def GetStats(self, request, context):
        by_subtype = {}
        entries = self._pool.entries()
        for entry in entries:
            states = by_subtype.setdefault(entry.subtype, {})
            states[entry.state.value] = states.get(entry.state.value, 0) + 1
        counts = metrics.checkout_counts()
        reply = pb.GetStatsResponse(total=len(entries),
                                    capacity=self._pool.capacity)
        for subtype in sorted(set(by_subtype) | set(counts)):
            c = counts.get(subtype, {})
            reply.subtypes.add(subtype=subtype, states=by_subtype.get(subtype, {}),
                               hits=c.get("hit", 0), misses=c.get("miss", 0),
                               failed_handoffs=c.get("failed", 0))
        return reply

    @adapt
    def GetPrewarm(self, request, context):
        return self._targets()

    @adapt
    def SetPrewarm(self, request, context):
        subtype = subtype_from_request(request.subtype)
        self._prewarmer.set_target(subtype, request.count)
        return self._targets()

    @adapt
    def Flush(self, request, context):
        subtype = subtype_from_request(request.subtype) if request.subtype else ""
        deleted, kept = self._pool.flush(subtype)
        return pb.FlushResponse(deleted=deleted, kept=kept)

    def _targets(self):
        reply = pb.PrewarmResponse()
        for t in self._prewarmer.targets():
            reply.pools.add(subtype=t.spec.subtype, image=t.spec.image,
                            backend=t.spec.backend, target=t.target,
                            available=t.available, building=t.building,
                            recycle=t.spec.recycle, failures=t.failures,
                            last_error=t.last_error,
                            last_error_time=t.last_error_at)
        return reply


def extra_service(pool, prewarmer):
    """The (add function, servicer, name) triple ``service.serve`` takes."""
    return (pb_grpc.add_AdminServicer_to_server, AdminService(pool, prewarmer),
            SERVICE_NAME)
