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


def _frame(payload):
    return framing.HEADER.pack(len(payload)) + payload


def test_reader_cuts_frames_out_of_chunks_and_keeps_the_rest():
    reader = framing.FrameReader()
    stream = _frame(b"one") + _frame(b"two") + _frame(b"three")

    reader.feed(stream[:5])
    assert reader.next_frame() is None
    reader.feed(stream[5:12])

    assert reader.next_frame() == (b"one", [])
    assert reader.next_frame() is None
    reader.feed(stream[12:])
    assert reader.next_frame() == (b"two", [])
    assert reader.next_frame() == (b"three", [])
    assert len(reader) == 0


def test_reader_gives_fds_to_the_frame_holding_the_chunks_last_byte():
    """The tail of one frame and a whole next one may come in one chunk."""
    reader = framing.FrameReader()
    first, second = _frame(b"first"), _frame(b"second")
    r, w = os.pipe()
    try:
        reader.feed(first[:3])
        reader.feed(first[3:] + second, [r])

        assert reader.next_frame() == (b"first", [])
        assert reader.next_frame() == (b"second", [r])
    finally:
        os.close(r)
        os.close(w)


def test_reader_refuses_an_oversized_length():
    reader = framing.FrameReader()
    reader.feed(framing.HEADER.pack(framing.MAX_FRAME + 1))
    with pytest.raises(framing.FramingError):
        reader.next_frame()


def test_reader_closes_fds_past_what_one_frame_may_carry():
    reader = framing.FrameReader()
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    reader.feed(b"\x10", fds[:2])

    with pytest.raises(framing.FramingError):
        reader.feed(b"\x00", fds[2:])

    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_reader_close_closes_fds_of_frames_never_returned():
    reader = framing.FrameReader()
    fd = os.open(os.devnull, os.O_RDONLY)
    reader.feed(b"\x10\x00", [fd])

    reader.close()

    with pytest.raises(OSError):
        os.fstat(fd)
    assert len(reader) == 0
