"""Who is on the other end of a Unix socket, and whether the daemon serves it.

The kernel fills SO_PEERCRED when the peer connects (or listens), so it
cannot be forged by what the peer sends later.
"""

import dataclasses
import os
import socket
import struct

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclasses.dataclass(frozen=True)
class Peer:
    """The credentials of a connected process."""

    pid: int
    uid: int
    gid: int


def peer_of(sock):
    """Return the Peer of a connected Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Peer(*_UCRED.unpack(raw))


class PeerPolicy:
    """Root, the daemon's own user, listed uids, and listed or owning gids."""

    def __init__(self, allowed_uids=(), allowed_gids=(), socket_gid=None):
        self._uids = {0, os.geteuid(), *allowed_uids}
        self._gids = set(allowed_gids)
        if socket_gid is not None:
            self._gids.add(socket_gid)

    def allows(self, peer):
        """Return True when ``peer`` may use the daemon's sockets."""
        return peer.uid in self._uids or peer.gid in self._gids
