"""Frames on the hand-off socket: a little-endian u32 length, then a message.

A frame may carry file descriptors in SCM_RIGHTS, attached to its first
bytes. Both ends bound every read and write by a deadline, so that a peer that
stops sending mid-frame costs a bounded wait, never a thread.
"""

import array
import errno
import os
import socket
import struct
import time

HEADER = struct.Struct("<I")
MAX_FRAME = 64 * 1024

# Room for one descriptor more than any frame may carry, so that a peer that
# sends two is seen (and both are closed) instead of silently truncated.
_MAX_FDS_SEEN = 2
_CMSG_SPACE = socket.CMSG_SPACE(_MAX_FDS_SEEN * array.array("i").itemsize)
# The ancillary room for one recvmsg of a FrameReader's caller.
RECV_CMSG_SPACE = _CMSG_SPACE


class FramingError(Exception):
    """The peer broke the frame format, sent too much, or was too slow.

    ``fd_sent`` is true when a send failed after the bytes that carry the
    descriptor had left: the peer may hold it, so the sender must treat it
    as delivered.
    """

    fd_sent = False


class FrameTimeout(FramingError):
    """A deadline passed: the peer went quiet, whether or not it sent a byte."""


def send_frame(sock, payload, deadline, fd=None):
    """Send one frame, with ``fd`` in SCM_RIGHTS when given.

    ``deadline`` is a ``time.monotonic()`` value. Raises FramingError when the
    frame is too large or the deadline passes, and OSError when the peer is
    gone.
    """
    if len(payload) > MAX_FRAME:
        raise FramingError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    data = memoryview(HEADER.pack(len(payload)) + payload)
    ancillary = []
    if fd is not None:
        fds = array.array("i", [fd])
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
    while data:
        try:
            _set_timeout(sock, deadline, "send")
            sent = sock.sendmsg([data], ancillary)
        except (OSError, FramingError) as e:
            if ancillary or fd is None:
                if isinstance(e, TimeoutError):
                    raise FrameTimeout("timed out sending a frame") from None
                raise
            # Part of the frame, the descriptor with it, is already out.
            err = FramingError(f"frame cut short after its descriptor was sent: {e}")
            err.fd_sent = True
            raise err from e
        ancillary = []
        data = data[sent:]


def recv_frame(sock, deadline, idle_deadline=None):
    """Receive one frame; return ``(payload, fds)``, or None at a clean EOF.

    ``idle_deadline`` bounds the wait for the first byte (a connection kept
    open between requests); the rest of the frame then gets as long as
    ``deadline`` allowed when the call began. Without it, ``deadline`` bounds
    the whole frame. The caller owns the returned descriptors. Raises
    FramingError on a short, oversized or slow frame, closing any descriptors
    received with it.
    """
    fds = []
    budget = deadline - time.monotonic()
    try:
        first = _recv_exact(sock, 1, idle_deadline or deadline, deadline, fds,
                            allow_eof=True)
        if first is None:
            return None
        if idle_deadline is not None:
            # The frame's time runs from its first byte: a request that comes
            # after a long idle wait still gets the whole per-frame budget.
            deadline = time.monotonic() + budget
        header = first + _recv_exact(sock, HEADER.size - 1, deadline, deadline, fds)
        (length,) = HEADER.unpack(header)
        if length > MAX_FRAME:
            raise FramingError(f"frame length {length} exceeds {MAX_FRAME}")
        payload = _recv_exact(sock, length, deadline, deadline, fds)
    except BaseException:
        close_all(fds)
        raise
    return payload, fds


def close_all(fds):
    """Close every descriptor in ``fds``, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError as e:
            if e.errno != errno.EBADF:
                raise


def _recv_exact(sock, size, first_deadline, deadline, fds, allow_eof=False):
    buf = bytearray()
    while len(buf) < size:
        _set_timeout(sock, first_deadline if not buf else deadline, "receive")
        try:
            data, ancdata, flags, _ = sock.recvmsg(
                size - len(buf), _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            raise FrameTimeout("timed out receiving a frame") from None
        fds.extend(_fds_from(ancdata))
        if flags & socket.MSG_CTRUNC:
            raise FramingError("frame carried more descriptors than allowed")
        if not data:
            if allow_eof and not buf:
                return None
            raise FramingError(f"peer closed after {len(buf)} of {size} bytes")
        buf += data
    return bytes(buf)


class FrameReader:
    """Frames cut out of a stream read in large chunks, with their descriptors.

    A reader of exact sizes needs three receive calls a frame; one chunk
    usually holds a whole request. Descriptors come with the chunk that
    carries them, and a Unix stream recvmsg ends right after the message
    they rode on (unix_stream_read_generic stops once it took an fd list),
    so they belong to the frame that holds the chunk's last byte.
    """

    __slots__ = ("_buf", "_fds", "_fd_count")

    def __init__(self):
        self._buf = bytearray()
        self._fds = []  # (offset just past the chunk that carried them, fds)
        self._fd_count = 0

    def __len__(self):
        """Bytes buffered that no returned frame has taken."""
        return len(self._buf)

    def feed(self, data, fds=()):
        """Add a received chunk and the descriptors that came with it.

        The reader owns ``fds`` from then on. Raises FramingError when more
        descriptors wait than one frame may carry (they are closed).
        """
        self._buf += data
        if fds:
            self._fds.append((len(self._buf), list(fds)))
            self._fd_count += len(fds)
            if self._fd_count > _MAX_FDS_SEEN:
                self.close()
                raise FramingError("frame carried more descriptors than allowed")

    def next_frame(self):
        """Return the next whole frame as ``(payload, fds)``, or None.

        The caller owns the returned descriptors. Raises FramingError when
        the header announces more than MAX_FRAME bytes.
        """
        buf = self._buf
        if len(buf) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(buf)
        if length > MAX_FRAME:
            raise FramingError(f"frame length {length} exceeds {MAX_FRAME}")
        end = HEADER.size + length
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER.size:end])
        del buf[:end]
        fds = []
        if self._fds:
            while self._fds and self._fds[0][0] <= end:
                fds.extend(self._fds.pop(0)[1])
            self._fds = [(offset - end, more) for offset, more in self._fds]
            self._fd_count -= len(fds)
        return payload, fds

    def close(self):
        """Close the descriptors of frames not returned, and drop their bytes."""
        waiting, self._fds, self._fd_count = self._fds, [], 0
        self._buf.clear()
        for _, fds in waiting:
            close_all(fds)


def fds_from(ancdata):
    """The descriptors in ``recvmsg`` ancillary data (SCM_RIGHTS)."""
    return _fds_from(ancdata)


def _fds_from(ancdata):
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


def _set_timeout(sock, deadline, what):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FrameTimeout(f"timed out waiting to {what} a frame")
    sock.settimeout(remaining)
