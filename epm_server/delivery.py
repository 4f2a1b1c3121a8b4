"""Did the peer take the fd we sent, or did the kernel throw it away?

``sendmsg`` succeeds as soon as a message is queued on the receiving socket,
before anyone reads it. A client that dies, or a published client that never
accepts the daemon's connection, leaves the fd in a queue that the kernel
purges when that socket closes: nobody ever owned it, and the enclave may go
back to the pool. Two kernel facts tell the cases apart (net/unix/af_unix.c):

- SIOCOUTQ on the sender is the memory of messages the receiver has not
  read yet; it drops to 0 when the receiver has read the whole message;
- when a stream socket is released with unread data in its queue, or was
  never accepted, ``unix_release_sock`` sets ECONNRESET on its peer, before
  it purges the queue. A peer that read everything and closed sets none.

The reset is read with SO_ERROR rather than a peeking recv: a peer that
sent its next request before dying would make the recv return that request
and hide the reset. A peer that only shut its write side is still open.
"""

import enum
import errno
import fcntl
import select
import socket
import struct
import termios
import time

# SIOCOUTQ is TIOCOUTQ on Linux (include/uapi/linux/sockios.h).
_SIOCOUTQ = termios.TIOCOUTQ
_INT = struct.Struct("i")
# The first look comes at once; later ones back off to this interval.
_MAX_SLICE = 0.05


class Delivery(enum.Enum):
    """What became of a message (and its fd) sent on a stream socket."""

    READ = "read"            # the peer read it: it owns the fd
    DISCARDED = "discarded"  # the peer closed unread: the kernel closed the fd
    UNKNOWN = "unknown"      # still queued at the deadline: the peer may read it


def unread_bytes(sock):
    """Bytes this socket sent that the peer has not read (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, _INT.pack(0))
    return _INT.unpack(raw)[0]


def delivery_state(sock):
    """One look: READ, DISCARDED, or None while the message is still queued."""
    # Queue length first: a purge after a reset empties it too, and the reset
    # is set before the purge, so the error read next sees it.
    unread = unread_bytes(sock)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
        return Delivery.DISCARDED
    return Delivery.READ if unread == 0 else None


def probe(sock):
    """A look that never raises, for the pool to call (``Pool.sent``): the
    delivery_state, or None when ``sock`` is closed already."""
    try:
        return delivery_state(sock)
    except (OSError, ValueError):
        return None


def wait_delivery(sock, deadline):
    """Wait until ``deadline`` (monotonic) for the peer to read or drop a message.

    Call it right after the send. Data the peer sends meanwhile is left
    unread for the caller. Returns a Delivery.
    """
    # Not POLLIN: a client that sends its next request before reading the
    # reply must not turn this wait into a spin. A close shows as RDHUP/HUP,
    # a reset as ERR (always reported).
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    slice_s = 0.0005
    hung_up = False
    while True:
        outcome = delivery_state(sock)
        if outcome is not None:
            return outcome
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Delivery.UNKNOWN
        if hung_up:
            # A peer that shut only its write side stays readable-at-EOF:
            # polling again would return at once, so wait the slice out.
            time.sleep(min(remaining, slice_s))
        else:
            hung_up = bool(poller.poll(min(remaining, slice_s) * 1000))
        slice_s = min(slice_s * 2, _MAX_SLICE)
