"""gRPC health checking and server reflection on the daemon's socket."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

SERVICE = "v1alpha1.EnclavePoolManager"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def channel(daemon):
    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}") as ch:
        yield ch


@pytest.mark.parametrize("service", ["", SERVICE])
def test_serving_while_up(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == SERVING


def test_unknown_service_is_not_found(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("service", ["", SERVICE])
def test_not_serving_once_shutdown_starts(daemon, channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=20)
    assert next(watch).status == SERVING

    daemon.proc.terminate()

    assert next(watch).status == NOT_SERVING
    watch.cancel()
    # No second signal: one that comes half a second later means "now".
    assert daemon.proc.wait(30) == 0


def test_reflection_lists_the_services(channel):
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
