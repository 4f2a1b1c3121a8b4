"""Exclusive ownership under load: many client processes, one pool.

EPM_LOAD_CLIENTS and EPM_LOAD_CYCLES scale the run (by hand, for example
16 and 200); the defaults keep `make test` short on two cores.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import grpc

from conftest import REPO
from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc
from test_handoff import wait_for_fds

WORKER = pathlib.Path(__file__).with_name("load_worker.py")
CLIENTS = int(os.environ.get("EPM_LOAD_CLIENTS", "6"))
CYCLES = int(os.environ.get("EPM_LOAD_CYCLES", "40"))
POOL = "enclave-cache-pool"
CONFIG = "[pool]\nmax_total = 4096\nmax_per_identity = 4096\n"


def run_workers(daemon, claims, clients, cycles, seconds=120):
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), str(daemon.grpc_socket), str(claims),
         str(cycles), str(seconds), str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for seed in range(clients)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    return results


def entries(stub):
    caches = stub.ListCache(pb.ListCacheRequest(type=POOL)).caches
    states = {}
    for cache in caches:
        enclave = pb.Enclave()
        cache.options.Unpack(enclave)
        states[cache.ID] = enclave.state
    return states


def wait_until(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_no_enclave_is_held_twice_and_every_one_is_accounted_for(
        make_daemon, tmp_path):
    daemon = make_daemon(CONFIG)
    claims = tmp_path / "claims"
    claims.mkdir()
    channel = grpc.insecure_channel(f"unix:{daemon.grpc_socket}")
    stub = pb_grpc.EnclavePoolManagerStub(channel)
    stub.Healthz(pb.HealthzRequest())
    baseline = daemon.open_fds()

    results = run_workers(daemon, claims, CLIENTS, CYCLES)

    assert [e for r in results for e in r["errors"]] == []
    assert sum(r["cycles"] for r in results) == CLIENTS * CYCLES
    assert list(claims.iterdir()) == []
    built = [tag for r in results for tag in r["built"]]
    assert len(built) == len(set(built))
    handed_out = {pool_id for r in results for pool_id, _ in r["checked_out"]}
    saved = [i for r in results for i in r["checked_in"]]
    unsaved = [i for r in results for i in r["unsaved"]]
    assert len(set(saved + unsaved)) == len(saved) + len(unsaved)
    # Unsaved enclaves' owners have exited: the reaper discards them.
    assert wait_until(lambda: not set(entries(stub)) & set(unsaved))
    reaped = {json.loads(line)["id"] for line in daemon.log.read_text().splitlines()
              if '"enclave_owner_died"' in line}
    assert set(unsaved) <= reaped
    assert not set(unsaved) & handed_out
    available = entries(stub)
    assert set(available.values()) <= {"available"}
    for pool_id in saved:
        assert (pool_id in handed_out) != (pool_id in available), pool_id
    # Each pooled enclave is one fd; after a flush none is left.
    assert wait_for_fds(daemon, baseline + len(available)) == \
        baseline + len(available)
    for pool_id in available:
        stub.DeleteCache(pb.DeleteCacheRequest(type=POOL, ID=pool_id))
    assert wait_for_fds(daemon, baseline) == baseline
    assert daemon.proc.poll() is None
    channel.close()
