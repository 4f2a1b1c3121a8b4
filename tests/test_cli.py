"""epmctl list and flush, against a live daemon and without one."""

import json
import os
import subprocess
import sys

from epm_client import Client
from test_client import pooled


def epmctl(socket, *args):
    return subprocess.run(
        [sys.executable, "-m", "epm_client.cli", "--socket", str(socket), *args],
        capture_output=True, text=True, timeout=60)


def test_list_shows_a_table(daemon):
    with Client(daemon.grpc_socket) as client:
        pool_id = pooled(client, b"x")
    result = epmctl(daemon.grpc_socket, "list")
    assert result.returncode == 0, result.stderr
    header, row, total = result.stdout.splitlines()
    assert header.split()[:3] == ["ID", "SUBTYPE", "STATE"]
    assert row.split()[:5] == [pool_id, "skeleton-0.0.0", "available", "sim", "1"]
    assert total == "1 enclave"


def test_list_json(daemon):
    with Client(daemon.grpc_socket) as client:
        pool_id = pooled(client, b"x")
    result = epmctl(daemon.grpc_socket, "list", "--json")
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert entry["id"] == pool_id
    assert entry["state"] == "available"
    assert entry["identity"]["mrenclave"] == "11" * 32
    assert len(entry["layout"]) == 2


def test_flush_empties_the_pool(daemon):
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"x")
        pooled(client, b"y", subtype="other")
        result = epmctl(daemon.grpc_socket, "flush", "other")
        assert (result.returncode, result.stdout) == (
            0, "flushed 1 enclave of subtype other\n")
        assert [e.subtype for e in client.list()] == ["skeleton-0.0.0"]
        result = epmctl(daemon.grpc_socket, "flush")
        assert (result.returncode, result.stdout) == (0, "flushed 1 enclave\n")
        assert client.list() == []


def test_daemon_down_prints_one_line_and_fails(tmp_path):
    for command in (["list"], ["flush"]):
        result = epmctl(tmp_path / "epm.sock", *command)
        assert result.returncode != 0
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1
        assert "epm is not reachable: no socket at" in result.stderr
        assert os.fspath(tmp_path) in result.stderr


def test_a_user_without_access_is_told_so(daemon):
    """epmctl, run as nobody in a forked child, names the permission problem."""
    import grpc  # noqa: F401  (nobody may not read the venv under /root)
    from epm_api import v1alpha1_pb2_grpc  # noqa: F401
    from epm_client import cli
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            sys.stderr = open(write, "w", closefd=False)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = cli.main(["--socket", str(daemon.grpc_socket), "list"])
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        stderr = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert stderr.startswith("epmctl: permission denied on the epm socket")
    assert len(stderr.splitlines()) == 1
