"""Did the peer read the reply that carried its fd?

``sendmsg`` succeeds as soon as a message is queued on the receiving socket,
before anyone reads it. Two kernel facts tell what became of it
(net/unix/af_unix.c):

- SIOCOUTQ on the sender is the memory of messages the receiver has not
  read yet; it drops to 0 when the receiver has read the whole message;
- when a stream socket is released with unread data in its queue, or was
  never accepted, ``unix_release_sock`` sets ECONNRESET on its peer, before
  it purges the queue. A peer that read everything and closed sets none.

Neither proves that the peer does not hold the fd: a receive with MSG_PEEK,
or one of no bytes, installs the message's fds and leaves the message
queued, so a peer can take the fd, close, and look like one that never read
it. DISCARDED therefore means only "closed unread": the enclave may be in
the peer's hands, and the daemon never gives it to another client.

The reset is read with SO_ERROR rather than a peeking recv: a peer that
sent its next request before dying would make the recv return that request
and hide the reset. A peer that only shut its write side is still open.
"""

import enum
import errno
import fcntl
import socket
import struct
import termios

# SIOCOUTQ is TIOCOUTQ on Linux (include/uapi/linux/sockios.h).
_SIOCOUTQ = termios.TIOCOUTQ
_INT = struct.Struct("i")


class Delivery(enum.Enum):
    """What became of a message (and its fd) sent on a stream socket."""

    READ = "read"            # the peer read it: it owns the fd
    DISCARDED = "discarded"  # the peer closed unread (it may have taken the fd)
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
