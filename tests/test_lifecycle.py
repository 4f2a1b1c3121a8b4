"""The daemon's life: SIGTERM under load, a second daemon, a restart."""

import json
import os
import socket
import subprocess
import sys
import time


from conftest import REPO, Daemon
from epm_client.client import Client
from load_worker import IDENTITY, LAYOUT, SUBTYPE, build
from test_bundle import FILES, T0, Bundles, read_tree
from test_load import WORKER


def test_sigterm_under_load_finishes_calls_and_removes_everything(
        make_daemon, tmp_path):
    daemon = make_daemon()
    claims = tmp_path / "claims"
    claims.mkdir()
    workers = [subprocess.Popen(
        [sys.executable, str(WORKER), str(daemon.grpc_socket), str(claims),
         "100000", "60", str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for seed in range(4)]
    time.sleep(1.5)

    started = time.monotonic()
    assert daemon.stop() == 0
    took = time.monotonic() - started

    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err
        results.append(json.loads(out))
    assert took < 10
    assert all(r["cycles"] > 0 for r in results)
    # Each worker ran until the daemon went away: refused, never confused.
    for r in results:
        assert len(r["errors"]) == 1, r["errors"]
        assert r["errors"][0].startswith("DaemonUnavailable"), r["errors"]
    assert list(claims.iterdir()) == []
    assert not daemon.grpc_socket.exists() and not daemon.handoff_socket.exists()
    assert daemon.events("pool_closed") and daemon.events("epm_stopped")


def test_second_daemon_does_not_steal_a_live_socket(daemon):
    (daemon.dir / "second").mkdir()
    second = Daemon(daemon.dir / "second")
    second.config.write_text(daemon.config.read_text())

    result = subprocess.run(
        [sys.executable, "-m", "epm_server.main", "--config", str(second.config)],
        capture_output=True, text=True, timeout=30, cwd=REPO)

    assert result.returncode == 1 and "another daemon" in result.stderr
    client = Client(daemon.grpc_socket)
    assert client.health() and client.check_out(SUBTYPE, IDENTITY) is None
    client.close()


def test_stale_socket_files_are_taken_over(tmp_path):
    daemon = Daemon(tmp_path)
    daemon.run_dir.mkdir()
    for path in (daemon.grpc_socket, daemon.handoff_socket):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()

    daemon.start()
    try:
        # The stale files exist from the start: wait for the daemon's word.
        deadline = time.monotonic() + 30
        while not daemon.events("epm_started") and time.monotonic() < deadline:
            time.sleep(0.05)
        client = Client(daemon.grpc_socket)
        assert client.health()
        assert client.check_out(SUBTYPE, IDENTITY) is None
        client.close()
    finally:
        assert daemon.stop() == 0


def test_restart_keeps_bundle_caches_and_clients_build_on_an_empty_pool(
        tmp_path):
    allowed = tmp_path / "bundles"
    allowed.mkdir()
    daemon = Daemon(tmp_path, f'[bundle]\nallowed_roots = ["{allowed}"]\n').start()
    try:
        bundles = Bundles(daemon, allowed)
        bundles.save(T0, "c0", bundles.tree("src", FILES))
        client = Client(daemon.grpc_socket)
        fd, _ = build()
        client.save_final(client.check_in(fd, SUBTYPE, LAYOUT, IDENTITY))
        os.close(fd)
        client.close()
        bundles.channel.close()
    finally:
        assert daemon.stop() == 0

    daemon.start()
    try:
        bundles = Bundles(daemon, allowed)
        target = allowed / "loaded"
        assert bundles.list(T0) == ["c0"]
        assert bundles.load(T0, "c0", target).ok
        assert read_tree(target) == FILES
        client = Client(daemon.grpc_socket)
        # Pooled enclaves died with the old daemon: this client builds.
        assert client.check_out(SUBTYPE, IDENTITY) is None
        fd, _ = build()
        assert client.check_in(fd, SUBTYPE, LAYOUT, IDENTITY)
        os.close(fd)
        client.close()
        bundles.channel.close()
    finally:
        assert daemon.stop() == 0
