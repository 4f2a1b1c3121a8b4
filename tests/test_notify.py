"""sd_notify and the watchdog, against a datagram socket the test owns."""

import socket
import time

import pytest

from epm_server import systemd


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound datagram socket set as $NOTIFY_SOCKET for daemons started next."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def messages(sock, until, timeout=10):
    """Datagrams received until one contains ``until``; each a set of lines."""
    found = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        found.append(set(data.decode().splitlines()))
        if until in found[-1]:
            return found
    raise AssertionError(f"no {until} in {found}")


def test_ready_once_both_sockets_accept_then_stopping(make_daemon, notify_socket):
    daemon = make_daemon()

    [ready] = messages(notify_socket, "READY=1")
    assert daemon.grpc_socket.exists() and daemon.handoff_socket.exists()
    daemon.stop()

    assert "STOPPING=1" in messages(notify_socket, "STOPPING=1")[-1]


def test_watchdog_pings_at_half_the_interval(make_daemon, notify_socket,
                                             monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    make_daemon()
    messages(notify_socket, "READY=1")

    start = time.monotonic()
    messages(notify_socket, "WATCHDOG=1", timeout=20)
    messages(notify_socket, "WATCHDOG=1", timeout=20)

    # Two pings at 0.5 s apart, with room for a loaded 2-core machine.
    assert time.monotonic() - start < 10.0


def test_no_watchdog_for_another_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    assert systemd.watchdog_interval() == 0.5


def test_watchdog_is_withheld_while_the_daemon_does_not_serve(notify_socket):
    alive = [True]
    watchdog = systemd.Watchdog(0.05, lambda: alive[0])
    watchdog.start()
    try:
        messages(notify_socket, "WATCHDOG=1")
        alive[0] = False
        time.sleep(0.1)
        notify_socket.settimeout(0.01)
        while True:  # drain what was sent before the switch
            try:
                notify_socket.recv(4096)
            except TimeoutError:
                break
        notify_socket.settimeout(0.3)
        with pytest.raises(TimeoutError):
            notify_socket.recv(4096)
    finally:
        watchdog.stop()


def test_notify_outside_systemd_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify(b"READY=1") is False
