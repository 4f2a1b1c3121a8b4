"""The `epm` process: start-up, bad configs, and a clean stop on signals."""

import signal
import socket
import subprocess
import sys

import pytest

from conftest import REPO, Daemon


def run_epm(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "epm_server.main", *args],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_removes_sockets(make_daemon, sig):
    daemon = make_daemon()

    assert daemon.stop(sig) == 0

    assert not daemon.grpc_socket.exists()
    assert not daemon.handoff_socket.exists()
    log = daemon.log.read_text()
    assert '"epm_started"' in log and '"epm_stopped"' in log


def test_sockets_are_mode_0660_in_a_1770_directory(daemon):
    assert daemon.grpc_socket.stat().st_mode & 0o777 == 0o660
    assert daemon.handoff_socket.stat().st_mode & 0o777 == 0o660
    assert daemon.run_dir.stat().st_mode & 0o7777 == 0o1770


def test_stale_socket_file_is_replaced(tmp_path):
    daemon = Daemon(tmp_path)
    daemon.run_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(daemon.handoff_socket))
    stale.close()  # the file stays, nobody listens: a crashed daemon's leftover

    try:
        daemon.start()
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("text, message", [
    (b"[grpc]\naddress = 3\n", "grpc.address: expected a string, got 3"),
    (b"uid = 99999999999\n", "uid: expected an integer from 0 to"),
    (b"max_recv_message_size = 99999999999\n", "max_recv_message_size: expected"),
    (b"[handoff]\ntimeout = nan\n", "handoff.timeout: expected a finite"),
    (b'root = "/srv/\xff"\n', "not UTF-8"),
    (b'[grpc]\naddress = "/tmp/e.sock"\n[handoff]\naddress = "/tmp/e.sock"\n',
     "handoff.address: /tmp/e.sock is the gRPC socket's address too"),
])
def test_bad_config_exits_with_one_line_naming_the_key(tmp_path, text, message):
    config = tmp_path / "config.toml"
    config.write_bytes(text)

    result = run_epm("--config", str(config))

    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_missing_explicit_config_exits_non_zero(tmp_path):
    result = run_epm("--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_second_daemon_on_the_same_socket_refuses_to_start(daemon):
    result = run_epm("--config", str(daemon.config))
    assert result.returncode == 1
    assert "another daemon" in result.stderr
    assert daemon.grpc_socket.exists() and daemon.handoff_socket.exists()


def test_signals_during_a_busy_main_loop_always_stop_the_daemon(make_daemon):
    """SIGINT and SIGTERM stop the daemon every time, not nearly every time.

    The handler once called threading.Event.set, which could deadlock on the
    event's lock when the signal landed while the main thread held it.
    """
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        d = make_daemon()
        assert d.stop(sig, timeout=15) == 0
        assert not d.grpc_socket.exists()


def test_a_socket_path_too_long_stops_the_daemon_before_it_makes_anything(
        tmp_path):
    run_dir = tmp_path / ("d" * 200)
    config = tmp_path / "config.toml"
    config.write_text(f'root = "{tmp_path}/root"\ndb_path = "{tmp_path}/db"\n'
                      f'[grpc]\naddress = "{run_dir}/epm.sock"\n')

    result = run_epm("--config", str(config))

    assert result.returncode == 2
    assert result.stderr.startswith(f"epm: {config}: grpc.address: the path is ")
    assert len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_an_open_runtime_directory_is_warned_about_once(tmp_path):
    daemon = Daemon(tmp_path)
    daemon.run_dir.mkdir()
    daemon.run_dir.chmod(0o777)
    try:
        daemon.start()
    finally:
        assert daemon.stop() == 0
    assert len(daemon.events("runtime_dir_open_to_all")) == 1


def test_a_second_signal_stops_at_once(tmp_path):
    """The first SIGINT waits for hand-offs in flight; the second does not.

    A hand-off client that checks an enclave out and never reads the reply
    holds the first stop until the reply's deadline (20 s here): the
    enclave may be in its hands, and the daemon waits to know.
    """
    import time
    from test_handoff import Client, enclave, pool_one
    from epm_api import handoff_pb2 as hpb
    daemon = Daemon(tmp_path, "[handoff]\ntimeout = 20\n").start()
    try:
        pool_one(daemon.handoff_socket)
        stalled = Client(daemon.handoff_socket)
        stalled.send_raw(hpb.HandoffRequest(check_out=hpb.CheckOut(
            subtype="skeleton-0.0.0",
            identity=enclave().identity)).SerializeToString())
        daemon.proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert daemon.proc.poll() is None
        daemon.proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        code = daemon.proc.wait(10)
        took = time.monotonic() - started
        stalled.close()
    finally:
        daemon.stop(signal.SIGKILL)

    assert code == 128 + signal.SIGINT and took < 3
    assert not daemon.grpc_socket.exists()
    assert not daemon.handoff_socket.exists()
    assert [e["signal"] for e in daemon.events("epm_stopped_at_once")] == [
        "SIGINT"]


def test_the_first_signal_drops_a_legacy_check_in_whose_fd_never_comes(tmp_path):
    """A published client that connects for its check-in and sends nothing
    does not hold the graceful stop for its 20 s: the check-in is dropped."""
    import time
    import legacy_client
    from epm_api import v1alpha1_pb2 as pb
    daemon = Daemon(tmp_path, "[handoff]\ntimeout = 20\n"
                    "[legacy]\naccept_timeout = 20\n").start()
    try:
        cache = pb.Cache(type=legacy_client.POOL, subType="s", ID="stalled")
        cache.options.Pack(legacy_client.layout())
        legacy_client.call(str(daemon.grpc_socket), "SaveCache",
                           pb.SaveCacheRequest(cache=cache))
        with socket.socket(socket.AF_UNIX) as stalled:
            stalled.connect(str(daemon.run_dir / "stalled"))
            time.sleep(0.3)  # accepted: the daemon waits for the fd
            started = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            code = daemon.proc.wait(10)
            took = time.monotonic() - started
    finally:
        daemon.stop(signal.SIGKILL)

    assert code == 0 and took < 3
    assert [(e["id"], e["reason"]) for e in daemon.events(
        "legacy_check_in_failed")] == [("stalled", "the daemon is shutting down")]
    assert not (daemon.run_dir / "stalled").exists()
