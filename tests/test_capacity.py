"""Capacity: limits per identity and in total, and the descriptor limit."""

import os
import resource

from epm_client import errors
from epm_client.client import Client
from test_handoff import Client as RawClient
from test_handoff import enclave, identity, sealed_memfd, wait_for_fds

LIMITS = "[pool]\nmax_total = 3\nmax_per_identity = 2\n"


def check_in(client, mrenclave):
    fd = sealed_memfd()
    try:
        reply = client.check_in(fd, enc=enclave(identity(mrenclave)))
        # Refused or not, the client's own copy works and closes normally.
        assert os.pread(fd, 6, 0) == b"enclav"
    finally:
        os.close(fd)
    return reply


def test_check_in_past_a_limit_is_resource_exhausted(make_daemon):
    daemon = make_daemon(LIMITS)
    client = RawClient(daemon.handoff_socket)
    client.check_out()
    baseline = daemon.open_fds()

    a = [check_in(client, b"\xaa" * 32) for _ in range(3)]
    b = [check_in(client, b"\xbb" * 32) for _ in range(2)]

    assert [r.code for r in a] == [0, 0, 8]
    assert "2 enclaves of this identity" in a[2].message
    assert [r.code for r in b] == [0, 8]
    assert "3 enclaves in total" in b[1].message
    # Three held enclaves: each is an fd, and one pidfd watches their owner.
    assert wait_for_fds(daemon, baseline + 4) == baseline + 4
    client.close()


def test_client_library_raises_resource_exhausted(make_daemon):
    daemon = make_daemon("[pool]\nmax_total = 1\n")
    client = Client(daemon.grpc_socket)
    from load_worker import IDENTITY, LAYOUT, SUBTYPE, build
    fds = [build()[0] for _ in range(2)]

    client.check_in(fds[0], SUBTYPE, LAYOUT, IDENTITY)
    try:
        client.check_in(fds[1], SUBTYPE, LAYOUT, IDENTITY)
        raise AssertionError("second check-in was accepted")
    except errors.ResourceExhausted:
        pass
    client.close()
    for fd in fds:
        os.close(fd)


def _nofile(soft, hard):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_nofile_is_raised_to_the_hard_limit_and_capacity_logged(make_daemon):
    daemon = make_daemon(preexec_fn=_nofile(256, 2048))

    (capacity,) = daemon.events("epm_capacity")

    assert (capacity["nofile"], capacity["max_total"]) == (2048, 256)
    soft = int(open(f"/proc/{daemon.proc.pid}/limits").read().split(
        "Max open files")[1].split()[0])
    assert soft == 2048


def test_a_low_descriptor_limit_lowers_the_pool_capacity(make_daemon):
    daemon = make_daemon(preexec_fn=_nofile(200, 200))

    (capacity,) = daemon.events("epm_capacity")

    assert capacity["max_total"] == 200 - 128
    assert daemon.events("pool_capacity_limited_by_nofile")
