"""The systemd service protocols: sd_notify(3), the watchdog, fd passing.

Each is a few lines over a Unix socket, so the daemon speaks them itself
rather than linking libsystemd: messages go to ``$NOTIFY_SOCKET`` (a path, or
an abstract name starting with ``@``), the watchdog interval comes from
``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``, and descriptors passed back at
start arrive at fd 3 onwards, as ``$LISTEN_FDS``, ``$LISTEN_FDNAMES`` and
``$LISTEN_PID`` say (sd_listen_fds(3)). Outside systemd every function here
does nothing.
"""

import array
import os
import socket
import threading

import structlog

log = structlog.get_logger(__name__)

# sd_listen_fds(3): passed descriptors start here.
LISTEN_FDS_START = 3
# An FDNAME is at most 255 characters with no ':' or control characters
# (sd_pid_notify_with_fds(3)).
MAX_FDNAME = 255


def notifying():
    """True when a service manager listens for our notifications."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(state, fds=(), block=True):
    """Send ``state`` (bytes, ``KEY=VALUE`` lines) to systemd, with ``fds``.

    Returns False outside systemd (no ``$NOTIFY_SOCKET``). Raises OSError
    when the socket refuses the message, BlockingIOError when ``block`` is
    False and the manager's queue is full.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      array.array("i", fds).tobytes())]
    with socket.socket(socket.AF_UNIX,
                       socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendmsg([state], ancillary, 0 if block else socket.MSG_DONTWAIT,
                  address)
    return True


def watchdog_interval():
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None.

    None when systemd asked for no watchdog, or asked another process
    (``$WATCHDOG_PID`` names a pid that is not ours).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(usec)
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Watchdog:
    """Pings the service manager while ``alive()`` says the daemon serves.

    A daemon that stops answering (its accept loop ended, the gRPC server
    wedged) then stops pinging, and systemd restarts it after WatchdogSec.
    """

    def __init__(self, interval, alive):
        self._interval = interval
        self._alive = alive
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog",
                                        daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stopping.set()
        self._thread.join()

    def _run(self):
        while not self._stopping.wait(self._interval):
            try:
                healthy = self._alive()
            except Exception:
                log.exception("watchdog_check_failed")
                healthy = False
            if not healthy:
                log.warning("watchdog_withheld")
                continue
            try:
                notify(b"WATCHDOG=1")
            except OSError as e:
                log.warning("watchdog_ping_failed", reason=str(e))


def listen_fds():
    """Descriptors systemd passed at start: a list of (fd, name).

    Empty unless ``$LISTEN_PID`` is our pid. Names come from
    ``$LISTEN_FDNAMES`` (``""`` when missing). The variables are removed,
    so that they are read once.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()):
        return []
    try:
        count = int(count)
    except ValueError:
        return []
    names = names.split(":") if names else []
    names += [""] * (count - len(names))
    fds = []
    for i in range(max(count, 0)):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue  # not open: nothing to adopt
        fds.append((fd, names[i]))
    return fds
