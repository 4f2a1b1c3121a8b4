"""Frames on the hand-off socket: lengths, descriptors and deadlines."""

import array
import os
import socket
import time

import pytest

from epm_api import framing


def soon(seconds=2.0):
    return time.monotonic() + seconds


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_frame_round_trip_with_a_descriptor(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        framing.send_frame(a, b"hello", soon(), fd=w)
        payload, fds = framing.recv_frame(b, soon())
        assert payload == b"hello" and len(fds) == 1
        os.write(fds[0], b"x")
        os.close(fds[0])
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


def test_clean_eof_before_a_frame_is_none(pair):
    a, b = pair
    a.close()
    assert framing.recv_frame(b, soon()) is None


def test_eof_inside_a_frame_is_an_error(pair):
    a, b = pair
    a.sendall(framing.HEADER.pack(10) + b"abc")
    a.close()
    with pytest.raises(framing.FramingError, match="3 of 10"):
        framing.recv_frame(b, soon())


def test_oversized_length_is_refused(pair):
    a, b = pair
    a.sendall(framing.HEADER.pack(framing.MAX_FRAME + 1))
    with pytest.raises(framing.FramingError, match="exceeds"):
        framing.recv_frame(b, soon())


def test_every_descriptor_received_reaches_the_caller(pair):
    """Two fds are both returned, so the caller can refuse and close them."""
    a, b = pair
    r, w = os.pipe()
    before = len(os.listdir("/proc/self/fd"))
    data = framing.HEADER.pack(1) + b"z"
    a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        array.array("i", [r, w]).tobytes())])
    os.close(r)
    os.close(w)
    payload, fds = framing.recv_frame(b, soon())
    assert len(fds) == 2
    framing.close_all(fds)
    assert len(os.listdir("/proc/self/fd")) == before - 2


def test_slow_peer_times_out(pair):
    a, b = pair
    a.sendall(framing.HEADER.pack(4) + b"ab")
    with pytest.raises(framing.FrameTimeout):
        framing.recv_frame(b, soon(0.2))


def test_send_cut_short_after_the_descriptor_reports_it_sent(pair):
    """A peer that stops reading mid-frame may still hold the fd."""
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    r, w = os.pipe()
    try:
        with pytest.raises(framing.FramingError) as e:
            framing.send_frame(a, b"\0" * (framing.MAX_FRAME - 8), soon(0.3), fd=w)
        assert e.value.fd_sent
        data, ancdata, _, _ = b.recvmsg(1024, socket.CMSG_SPACE(4))
        assert ancdata, "the descriptor did reach the peer"
        framing.close_all(framing._fds_from(ancdata))
    finally:
        os.close(r)
        os.close(w)


def test_send_that_fails_before_any_byte_keeps_the_descriptor(pair):
    a, b = pair
    b.close()
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as e:
            framing.send_frame(a, b"x", soon(), fd=w)
        assert not getattr(e.value, "fd_sent", False)
    finally:
        os.close(r)
        os.close(w)
