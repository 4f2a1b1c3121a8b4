"""epmctl list and flush, against a live daemon and without one."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from epm_api import v1alpha1_pb2 as pb
from epm_client import Client
from test_client import identity, pooled


def epmctl(socket, *args, input="", env=None):
    prefix = [] if socket is None else ["--socket", str(socket)]
    return subprocess.run(
        [sys.executable, "-m", "epm_client.cli", *prefix, *args],
        capture_output=True, text=True, timeout=60, input=input,
        env=None if env is None else {**os.environ, **env})


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
        result = epmctl(daemon.grpc_socket, "flush", "--yes")
        assert (result.returncode, result.stdout) == (0, "flushed 1 enclave\n")
        assert client.list() == []


def test_daemon_down_prints_one_line_and_fails(tmp_path):
    for command in (["list"], ["flush"], ["stats"], ["prewarm"]):
        result = epmctl(tmp_path / "epm.sock", *command)
        assert result.returncode != 0
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1
        assert "epm is not reachable: no socket at" in result.stderr
        assert os.fspath(tmp_path) in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as nobody")
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


def test_list_filters_by_state_and_subtype(daemon):
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"x")
        pooled(client, b"y", subtype="other")
    result = epmctl(daemon.grpc_socket, "list", "--json", "--subtype", "other",
                    "--state", "available")
    assert [e["subtype"] for e in json.loads(result.stdout)] == ["other"]
    result = epmctl(daemon.grpc_socket, "list", "--json", "--state", "held")
    assert json.loads(result.stdout) == []


def test_flush_of_everything_asks_first(daemon):
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"x")
        declined = epmctl(daemon.grpc_socket, "flush", input="n\n")
        assert declined.returncode == 1
        assert "Close 1 available enclave of every subtype?" in declined.stderr
        assert declined.stderr.endswith(
            "epmctl: flush not confirmed; nothing closed\n")
        assert len(client.list()) == 1

        confirmed = epmctl(daemon.grpc_socket, "flush", input="y\n")
        assert (confirmed.returncode, confirmed.stdout) == (
            0, "flushed 1 enclave\n")
        assert client.list() == []


def test_epm_socket_chooses_the_daemon(daemon):
    result = epmctl(None, "list", env={"EPM_SOCKET": str(daemon.grpc_socket)})
    assert (result.returncode, result.stdout) == (0, "ID  SUBTYPE  STATE  BACKEND"
                                                  "  SIZE  MRENCLAVE  CREATED\n"
                                                  "0 enclaves\n")


def test_stats_counts_states_and_check_outs(daemon):
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"x")
        assert client.check_out("skeleton-0.0.0", identity(b"\x99" * 32)) is None
        assert client.check_out("nothing-here", identity()) is None
    result = epmctl(daemon.grpc_socket, "stats", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    by = {s["subtype"]: s for s in stats["subtypes"]}
    assert by["skeleton-0.0.0"]["states"] == {"available": 1}
    assert by["skeleton-0.0.0"]["misses"] == 1
    assert "nothing-here" not in by and by["(other)"]["misses"] == 1
    table = epmctl(daemon.grpc_socket, "stats").stdout.splitlines()
    assert table[0].split() == ["SUBTYPE", "PENDING", "HELD", "AVAILABLE",
                                "LEASED", "HITS", "MISSES", "FAILED"]
    assert table[-1].startswith("1 enclave of ")


def test_health_exit_codes(daemon, tmp_path):
    serving = epmctl(daemon.grpc_socket, "health")
    assert (serving.returncode, serving.stdout) == (0, "SERVING\n")

    gone = epmctl(tmp_path / "none.sock", "health")
    assert gone.returncode == 1
    assert gone.stderr.startswith("epmctl: epm is not reachable")


def test_health_exit_2_when_not_serving(tmp_path):
    """A daemon whose health service says NOT_SERVING (it is shutting down)."""
    import concurrent.futures
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc
    from epm_client import cli
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    path = tmp_path / "epm.sock"
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        servicer.enter_graceful_shutdown()
        assert cli.main(["--socket", str(path), "health"]) == 2
    finally:
        server.stop(0)


def test_prewarm_shows_and_sets_targets(make_daemon, images):
    daemon = make_daemon(f'[[prewarm]]\nimage = "{images / "8"}"\n'
                         'subtype = "warm"\ncount = 0\n')
    shown = epmctl(daemon.grpc_socket, "prewarm")
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()
    assert header.split()[:6] == ["SUBTYPE", "TARGET", "AVAILABLE", "BUILDING",
                                  "STATE", "RECYCLE"]
    assert row.split()[:5] == ["warm", "0", "0", "0", "ok"]

    changed = epmctl(daemon.grpc_socket, "prewarm", "warm", "1", "--json")
    assert json.loads(changed.stdout)[0]["target"] == 1

    unknown = epmctl(daemon.grpc_socket, "prewarm", "cold", "1")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("epmctl: subtype 'cold' has no")


def test_prewarm_shows_why_builds_fail(make_daemon, images):
    """No enclave device here: every sgx build fails, and epmctl says why."""
    daemon = make_daemon(f'[[prewarm]]\nimage = "{images / "8"}"\n'
                         'subtype = "warm"\nbackend = "sgx"\ncount = 2\n')
    deadline = time.monotonic() + 30
    while not daemon.events("prewarm_build_failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    reason = daemon.events("prewarm_build_failed")[0]["reason"]

    shown = epmctl(daemon.grpc_socket, "prewarm")
    as_json = json.loads(epmctl(daemon.grpc_socket, "prewarm", "--json").stdout)

    assert shown.returncode == 0, shown.stderr
    header, row, why = shown.stdout.splitlines()
    assert row.split()[:5] == ["warm", "2", "0", "0", "failing"]
    assert re.match("warm: [0-9]+ builds? failed, the last at 20", why)
    assert why.endswith(f": {reason}")
    [pool] = as_json
    assert pool["failures"] >= 1 and pool["last_error"] == reason
    assert abs(pool["last_error_time"] - time.time()) < 60


def test_usage_errors_exit_2(daemon):
    result = epmctl(daemon.grpc_socket, "prewarm", "warm")
    assert result.returncode == 2
    assert "give both SUBTYPE and COUNT" in result.stderr
    assert epmctl(daemon.grpc_socket, "list", "--state", "gone").returncode == 2


def test_help_documents_the_exit_codes():
    result = epmctl(None, "--help")
    assert "Exit status:" in result.stdout
    assert "not serving" in result.stdout


def test_flush_of_the_enclave_pool_is_one_admin_call(daemon):
    """epmctl flush closes every available enclave and keeps those in use."""
    from epm_client.admin import AdminClient
    from test_client import LAYOUT, identity, sealed_memfd
    with Client(daemon.grpc_socket) as client:
        for content in (b"a", b"b", b"c"):
            pooled(client, content)
        fd = sealed_memfd(b"held")
        try:
            client.check_in(fd, "skeleton-0.0.0", LAYOUT, identity())
        finally:
            os.close(fd)
        with AdminClient(daemon.grpc_socket) as admin:
            assert admin.flush("other") == (0, 0)
            assert admin.flush() == (3, 1)
        assert [e.state for e in client.list()] == ["held"]


def test_health_of_an_unknown_service_names_it(daemon):
    result = epmctl(daemon.grpc_socket, "health", "--service", "nope")
    assert result.returncode == 1
    assert result.stderr == ("epmctl: the daemon reports no health for service "
                             "'nope'\n")


def test_a_socket_option_naming_no_socket_says_so(daemon, tmp_path):
    """A file or a directory refuses a connect as a stale socket does; gRPC
    reports the hand-off socket as a bad HTTP/2 frame. Neither is the cause."""
    text = tmp_path / "config.toml"
    text.write_text("")
    results = {name: epmctl(path, "list") for name, path in (
        ("file", text), ("directory", tmp_path),
        ("handoff", daemon.handoff_socket))}

    for result in results.values():
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert results["file"].stderr.startswith(
        f"epmctl: {text} is not a socket: --socket (or $EPM_SOCKET) names the "
        "daemon's gRPC socket")
    assert results["directory"].stderr.startswith(
        f"epmctl: {tmp_path} is a directory, not a socket")
    assert results["handoff"].stderr == (
        f"epmctl: {daemon.handoff_socket} is epm's hand-off socket, not its gRPC "
        f"socket; the gRPC socket is {daemon.grpc_socket} unless the config "
        "moved it\n")


def bundle_daemon(make_daemon, tmp_path):
    from test_bundle import Bundles
    allowed = tmp_path / "bundles"
    allowed.mkdir()
    b = Bundles(make_daemon(f'[bundle]\nallowed_roots = ["{allowed}"]\n'), allowed)
    b.save(CACHE0, "parent", b.tree("p", {"a": b"x" * 3000}))
    b.save(CACHE0, "single", b.tree("s", {"a": b"y" * 10}))
    b.save(CACHE1, "child", b.tree("c", {"b": b"z"}), parent=(CACHE0, "parent"))
    return b


CACHE0, CACHE1 = "bundle-cache.occlum.cache0", "bundle-cache.occlum.cache1"


def test_list_of_bundle_caches_shows_their_sizes(make_daemon, tmp_path):
    b = bundle_daemon(make_daemon, tmp_path)
    sizes = {c.ID: c.size for c in b.stub.ListCache(
        pb.ListCacheRequest(type=CACHE0)).caches}

    table = epmctl(b.daemon.grpc_socket, "list", "--type", CACHE0)
    listed = json.loads(epmctl(b.daemon.grpc_socket, "list", "--type", CACHE1,
                               "--json").stdout)
    b.channel.close()

    assert table.returncode == 0, table.stderr
    header, *rows, total = table.stdout.splitlines()
    assert header.split() == ["ID", "SUBTYPE", "SIZE", "PARENT", "CREATED"]
    assert [r.split()[:4] for r in rows] == [
        ["parent", "occlum", str(sizes["parent"]), "B"],
        ["single", "occlum", str(sizes["single"]), "B"]]
    assert sizes["parent"] >= 3000 and total == "2 caches"
    [child] = listed
    assert child["parent"] == {"type": CACHE0, "id": "parent"}
    assert child["size"] > 0


def test_flush_of_bundle_caches_deletes_those_without_children(make_daemon,
                                                               tmp_path):
    b = bundle_daemon(make_daemon, tmp_path)

    declined = epmctl(b.daemon.grpc_socket, "flush", "--type", CACHE0,
                      input="n\n")
    flushed = epmctl(b.daemon.grpc_socket, "flush", "--type", CACHE0, "--yes")
    left = b.list(CACHE0)
    b.channel.close()

    assert declined.returncode == 1
    assert f"Delete 2 caches of type {CACHE0}, every subtype?" in declined.stderr
    assert (flushed.returncode, flushed.stdout) == (
        0, "deleted 1 cache; 1 with child caches kept\n")
    assert left == ["parent"]
