"""Listening Unix sockets with their mode and owner set before anyone connects."""

import os
import socket
import stat

SOCKET_MODE = 0o660


def listen_unix(path, uid=None, gid=None, backlog=64):
    """Bind, restrict and listen on a Unix stream socket at ``path``.

    Mode and owner are set between bind and listen: until listen, a connect
    is refused, so no peer can slip in under the umask's permissions.
    Returns the socket. Raises OSError (path too long, directory missing).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        try:
            os.chmod(path, SOCKET_MODE)
            if uid is not None or gid is not None:
                os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
            sock.listen(backlog)
        except BaseException:
            unlink_socket(path)
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def unlink_socket(path):
    """Remove ``path`` if it is a socket; leave anything else alone."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def is_served(path):
    """Return True when a process accepts connections on the socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
