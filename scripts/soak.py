"""Soak the daemon with mixed load for a while; fail on any error or growth.

    python scripts/soak.py --seconds 10 --clients 4
    python scripts/soak.py --seconds 600 --clients 16     # by hand

Starts `epm` in a temporary directory, runs ``tests/load_worker.py`` clients
(check-out, check-in, save final, drops, owners that never save) beside a
loop of admin calls (ListCache, PickCache, Healthz) and published-client
mistakes, then flushes the pool and compares the daemon's open fds and
resident memory with their values after warm-up. Prints one JSON report;
exits 1 on any error, on fd growth, or on memory growth past --max-rss-growth.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import grpc  # noqa: E402

from conftest import Daemon  # noqa: E402
from epm_api import v1alpha1_pb2 as pb  # noqa: E402
from epm_api import v1alpha1_pb2_grpc as pb_grpc  # noqa: E402

POOL = "enclave-cache-pool"
WORKER = REPO / "tests" / "load_worker.py"


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def admin_load(stub, stop, counts):
    """Admin calls and refused requests, as fast as the daemon answers."""
    bad = pb.GetCacheRequest(type=POOL, subType="load-0.0.0", ID="../x")
    while not stop.is_set():
        try:
            stub.ListCache(pb.ListCacheRequest(type=POOL), timeout=5)
            stub.PickCache(pb.PickCacheRequest(type=POOL, subType="load-0.0.0"),
                           timeout=5)
            stub.Healthz(pb.HealthzRequest(), timeout=5)
            counts["admin"] += 3
        except grpc.RpcError as e:
            counts["errors"].append(f"admin: {e.code().name} {e.details()}")
        try:
            stub.GetCache(bad, timeout=5)
            counts["errors"].append("admin: a bad ID was accepted")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                counts["errors"].append(f"admin: {e.code().name} for a bad ID")
        counts["admin"] += 1
        stop.wait(0.01)


def settle(daemon, expected, timeout=10):
    deadline = time.monotonic() + timeout
    while daemon.open_fds() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon.open_fds()


def soak(seconds, clients, max_rss_growth_kib):
    report = {"seconds": seconds, "clients": clients, "errors": []}
    with tempfile.TemporaryDirectory(prefix="epm-soak-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "claims").mkdir()
        daemon = Daemon(tmp, "[pool]\nmax_total = 4096\nmax_per_identity = 4096\n")
        daemon.start()
        channel = grpc.insecure_channel(f"unix:{daemon.grpc_socket}")
        stub = pb_grpc.EnclavePoolManagerStub(channel)
        try:
            stub.Healthz(pb.HealthzRequest(), timeout=5)
            fds0, rss0 = daemon.open_fds(), rss_kib(daemon.proc.pid)
            counts = {"admin": 0, "errors": report["errors"]}
            stop = threading.Event()
            admin = threading.Thread(target=admin_load, args=(stub, stop, counts))
            admin.start()
            workers = [subprocess.Popen(
                [sys.executable, str(WORKER), str(daemon.grpc_socket),
                 str(tmp / "claims"), "1000000000", str(seconds), str(seed)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                cwd=REPO) for seed in range(clients)]
            results = []
            for worker in workers:
                out, err = worker.communicate(timeout=seconds + 60)
                if worker.returncode != 0:
                    report["errors"].append(f"worker exited {worker.returncode}: "
                                            f"{err.strip()[-300:]}")
                    continue
                results.append(json.loads(out))
            stop.set()
            admin.join()
            for r in results:
                report["errors"].extend(r["errors"])
            report["operations"] = {
                "cycles": sum(r["cycles"] for r in results),
                "checked_out": sum(len(r["checked_out"]) for r in results),
                "built": sum(len(r["built"]) for r in results),
                "saved": sum(len(r["checked_in"]) for r in results),
                "unsaved": sum(len(r["unsaved"]) for r in results),
                "dropped": sum(r["dropped"] for r in results),
                "refused": sum(r["refused"] for r in results),
                "admin_calls": counts["admin"]}
            # Unsaved enclaves of exited workers go to the reaper; flush the rest.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                caches = stub.ListCache(pb.ListCacheRequest(type=POOL)).caches
                states = set()
                for cache in caches:
                    enclave = pb.Enclave()
                    cache.options.Unpack(enclave)
                    states.add(enclave.state)
                if states <= {"available"}:
                    break
                time.sleep(0.1)
            for cache in caches:
                stub.DeleteCache(pb.DeleteCacheRequest(type=POOL, ID=cache.ID))
            fds1 = settle(daemon, fds0)
            rss1 = rss_kib(daemon.proc.pid)
            report["fds"] = {"before": fds0, "after": fds1, "growth": fds1 - fds0}
            report["rss_kib"] = {"before": rss0, "after": rss1,
                                 "growth": rss1 - rss0}
            if fds1 != fds0:
                report["errors"].append(f"daemon fds grew by {fds1 - fds0}")
            if rss1 - rss0 > max_rss_growth_kib:
                report["errors"].append(f"daemon memory grew by {rss1 - rss0} KiB")
            if daemon.proc.poll() is not None:
                report["errors"].append("the daemon died")
        finally:
            channel.close()
            code = daemon.stop()
            if code != 0:
                report["errors"].append(f"daemon exited with {code}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    # A Python daemon's heap settles in the first seconds; a leak of one
    # entry per operation would pass this within a minute.
    parser.add_argument("--max-rss-growth", type=int, default=8192,
                        help="KiB of resident memory growth allowed")
    args = parser.parse_args(argv)
    report = soak(args.seconds, args.clients, args.max_rss_growth)
    print(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
