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
