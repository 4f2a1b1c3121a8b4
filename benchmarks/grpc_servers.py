"""grpc.aio against the thread-pool server, for the published clients' path.

The daemon serves gRPC from ``grpc.server`` with a thread pool. This
measures one unary call (Healthz, answered at once) to each kind of server
with nothing else behind it, so that the choice between them rests on a
figure: ``compare(runs)`` returns each server's median in microseconds.
Each server is a process of its own (``python grpc_servers.py KIND PATH``),
stopped by its pid.
"""

import asyncio
import concurrent.futures
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from epm_api import v1alpha1_pb2 as pb  # noqa: E402
from epm_api import v1alpha1_pb2_grpc as pb_grpc  # noqa: E402

KINDS = ("threads", "aio")


class _Threaded(pb_grpc.EnclavePoolManagerServicer):
    def Healthz(self, request, context):
        return pb.HealthzResponse(ok=True)


class _Async(pb_grpc.EnclavePoolManagerServicer):
    async def Healthz(self, request, context):
        return pb.HealthzResponse(ok=True)


def serve(kind, path):
    """Serve Healthz on the Unix socket ``path`` until killed."""
    if kind == "threads":
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_EnclavePoolManagerServicer_to_server(_Threaded(), server)
        server.add_insecure_port(f"unix:{path}")
        server.start()
        server.wait_for_termination()
        return

    async def main():
        server = grpc.aio.server()
        pb_grpc.add_EnclavePoolManagerServicer_to_server(_Async(), server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def compare(runs, rounds=2):
    """Median microseconds of one call to each kind: ``{kind: us}``.

    The kinds take turns ``rounds`` times, so drift lands on both alike.
    """
    samples = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="epm-bench-grpc-") as tmp:
        for i in range(rounds):
            for kind in KINDS:
                path = os.path.join(tmp, f"{kind}-{i}.sock")
                samples[kind] += _calls(kind, path, runs)
    return {kind: statistics.median(xs) for kind, xs in samples.items()}


def _calls(kind, path, runs):
    proc = subprocess.Popen([sys.executable, __file__, kind, path])
    try:
        channel = grpc.insecure_channel(f"unix:{path}")
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.EnclavePoolManagerStub(channel)
        for _ in range(min(runs, 100)):  # warm up
            stub.Healthz(pb.HealthzRequest(), timeout=5)
        took = []
        for _ in range(runs):
            t = time.perf_counter()
            stub.Healthz(pb.HealthzRequest(), timeout=5)
            took.append((time.perf_counter() - t) * 1e6)
        channel.close()
        return took
    finally:
        proc.kill()
        proc.wait(30)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
