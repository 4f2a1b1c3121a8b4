"""The ``epm`` entry point: read the config, serve both sockets, stop cleanly.

The daemon runs in the foreground (``sudo epm &``, or a systemd unit of type
notify). SIGTERM and SIGINT stop it: no new connections, calls in flight
finish, pooled fds are closed and both sockets removed. Under systemd the
available enclaves stay in its fd store and the next start adopts them.
"""

import argparse
import datetime
import errno
import json
import os
import resource
import signal
import socket
import sqlite3
import stat
import sys
import time

import structlog

from epm_server import config, log, metrics
from epm_server.bundle import BundleCaches
from epm_server.errors import ConfigError
from epm_server.fdstore import FdStore
from epm_server.handoff import HandoffServer
from epm_server.ids import is_id
from epm_server.legacy import LegacyHandoff
from epm_server.peers import PeerPolicy
from epm_server.pool import Pool
from epm_server.prewarm import Prewarmer, load_verified
from epm_server.admin import extra_service
from epm_server.reaper import OwnerReaper
from epm_server.reconcile import reconcile
from epm_server.records import Records
from epm_server.safecopy import AllowedRoots
from epm_server.metrics import Endpoint
from epm_server.service import EnclavePoolService, RpcTimer, serve
from epm_server.sockets import is_served, unlink_socket
from epm_server import systemd

logger = structlog.get_logger("epm")

# How long the watchdog's gRPC probe waits for its answer.
_PROBE_TIMEOUT = 5.0
# How long in-flight gRPC calls may run on after SIGTERM.
_GRACE = 5.0
# A second SIGTERM or SIGINT this long after the first stops the daemon at
# once. One sooner is the same stop sent twice (to the process and to its
# group, or by a supervisor that repeats itself), and is ignored.
_HURRY_AFTER = 0.5
# Descriptors kept for everything but pooled enclaves: hand-off and gRPC
# connections, legacy hand-offs in flight, the database, pidfds, logs.
FD_RESERVE = 128
# The runtime directory admits root and the configured group, nobody else;
# sticky, so that a client cannot remove another's legacy socket.
RUNTIME_DIR_MODE = 0o1770


class StartupError(Exception):
    """The daemon cannot serve (socket busy or unbindable); one line for stderr."""


def main(argv=None):
    """Run the daemon; return its exit code (0, 1 start-up failure, 2 config)."""
    parser = argparse.ArgumentParser(prog="epm", description="enclave pool manager")
    parser.add_argument("--config", help=f"config file (default {config.DEFAULT_PATH})")
    parser.add_argument("--log-level", choices=log.LEVELS, default="info")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        print(f"epm: {e}", file=sys.stderr)
        return 2
    try:
        not_recycled, images = _check_prewarm_images(cfg.prewarm)
    except ConfigError as e:
        # Named like the config's own errors: the file, then the key.
        print(f"epm: {args.config or config.DEFAULT_PATH}: {e}", file=sys.stderr)
        return 2
    log.configure(args.log_level)
    try:
        return run(cfg, not_recycled, images)
    except (StartupError, OSError, RuntimeError) as e:
        print(f"epm: {e}", file=sys.stderr)
        return 1


def _check_prewarm_images(prewarm):
    """Read and check each pre-warmed image, as ``prewarm.load_verified`` does.

    Returns (not_recycled, images): the (subtype, identity) pairs whose pool
    does not recycle (other images of the same subtype, such as the
    skeleton's other sizes, still do), and subtype -> (image, identity) for
    the Prewarmer. Raises ConfigError naming the table whose image cannot be
    read, or whose SIGSTRUCT does not verify or match it: a daemon that
    started would only log a failed build every few seconds.
    """
    if not prewarm:
        return [], {}
    # Imported here: a daemon without [[prewarm]] never loads the skeleton.
    from skeleton.errors import ImageError, SkeletonError
    not_recycled, images = [], {}
    for i, spec in enumerate(prewarm):
        try:
            image, identity = load_verified(spec)
        except ImageError as e:
            # It names the file already.
            raise ConfigError(f"prewarm[{i}].image: {e}") from None
        except SkeletonError as e:
            raise ConfigError(f"prewarm[{i}].image: {spec.image}: {e}") from None
        images[spec.subtype] = (image, identity)
        if not spec.recycle:
            not_recycled.append((spec.subtype, identity))
    return not_recycled, images


def run(cfg, not_recycled=(), images=None):
    """Serve until SIGTERM or SIGINT; return 0. Raises StartupError, OSError.

    When the gRPC server does not stop within its grace (its own threads
    died), the process exits at once with status 1 after the rest stopped.

    ``not_recycled`` lists the (subtype, identity) pairs whose returned
    enclaves are closed instead of pooled again; ``images`` holds the
    pre-warmed images read at start (see ``_check_prewarm_images``).
    """
    # The handler only appends: it runs in the main thread between bytecodes,
    # and one that took a lock (threading.Event.set does) could deadlock on
    # a lock the main thread held at that moment, ignoring the signal.
    signals = []
    first_at = []
    sockets = (cfg.grpc_address, cfg.handoff_path)

    def on_signal(signum, _):
        now = time.monotonic()
        if first_at and now - first_at[0] >= _HURRY_AFTER:
            _stop_now(signum, sockets)
        first_at.append(now)
        signals.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    # Each directory once: both sockets usually share one, and its warning
    # should be logged once.
    for directory in dict.fromkeys(os.path.dirname(p) or "." for p in
                                   (cfg.grpc_address, cfg.handoff_path)):
        _prepare_runtime_dir(directory, cfg.uid, cfg.gid)
    for path in (cfg.grpc_address, cfg.handoff_path):
        _prepare_socket_path(path)
    _remove_stale_legacy_sockets(cfg.socket_dir)
    records = _open_records(cfg)
    bundles = BundleCaches(cfg.root, records, AllowedRoots(
        cfg.allowed_roots, private=(cfg.root, cfg.db_path)))
    pool = Pool(_pool_capacity(cfg), cfg.max_per_identity, cfg.legacy_max_pending,
                no_recycle=not_recycled)
    metrics.follow(pool)
    fdstore = FdStore(pool, os.path.join(cfg.root, "fdstore"))
    fdstore.start()
    fdstore.adopt(systemd.listen_fds())
    prewarmer = Prewarmer(pool, cfg.prewarm, images=images)
    pool.on_hand_out(prewarmer.wake)
    policy = PeerPolicy(cfg.allowed_uids, cfg.allowed_gids, cfg.gid)
    legacy = LegacyHandoff(pool, cfg.socket_dir, policy,
                           accept_timeout=cfg.legacy_accept_timeout,
                           io_timeout=cfg.timeout)
    reaper = OwnerReaper(pool)
    handoff = HandoffServer(pool, reaper, cfg.handoff_path, policy, cfg.timeout,
                            cfg.idle_timeout, uid=cfg.uid, gid=cfg.gid,
                            max_connections=cfg.max_connections,
                            max_per_uid=cfg.max_connections_per_uid)
    server = watchdog = endpoint = None
    grpc_stuck = False
    reaper.start()
    try:
        handoff.start()
        server = serve(EnclavePoolService(pool, legacy, bundles), cfg.grpc_address,
                       cfg.max_recv_message_size, cfg.max_send_message_size,
                       uid=cfg.uid, gid=cfg.gid, interceptors=[RpcTimer()],
                       extra=[extra_service(pool, prewarmer)],
                       max_connections=cfg.grpc_max_connections,
                       handshake_timeout=cfg.grpc_handshake_timeout)
        if cfg.metrics_address is not None:
            endpoint = Endpoint(*cfg.metrics_address, pool)
            logger.info("metrics_started", host=cfg.metrics_address[0],
                        port=endpoint.port)
        logger.info("epm_started", grpc=cfg.grpc_address, handoff=cfg.handoff_path,
                    pid=os.getpid())
        _notify(b"READY=1\nSTATUS=serving")
        prewarmer.start()
        watchdog = _start_watchdog(handoff, cfg.grpc_address)
        # sleep() returns early enough: a signal interrupts it, the handler
        # runs, and the loop looks again.
        while not signals:
            time.sleep(0.2)
        logger.info("epm_stopping", signal=signal.Signals(signals[0]).name)
        # Health checks see NOT_SERVING before any call is refused.
        server.start_shutdown()
        _notify(b"STOPPING=1\nSTATUS=stopping")
    finally:
        if watchdog is not None:
            watchdog.stop()
        if endpoint is not None:
            endpoint.stop()
        prewarmer.stop()
        # Bounded: a gRPC server whose own threads died (it could not start
        # one) never reports that it stopped, and the stop must go on.
        if server is not None and not server.stop(_GRACE).wait(_GRACE + 5):
            logger.warning("grpc_stop_timed_out", waited_s=_GRACE + 5)
            grpc_stuck = True
        unlink_socket(cfg.grpc_address)
        handoff.stop()
        legacy.stop()
        reaper.stop()
        # Last: every thread that could send a pooled fd has ended.
        pool.close()
        fdstore.stop()
        records.close()
    logger.info("epm_stopped")
    if grpc_stuck:
        # Its worker threads wait for requests that its dead serving thread
        # will never deliver, and the interpreter's exit would join them.
        sys.stderr.flush()
        os._exit(1)
    return 0


def _stop_now(signum, sockets):
    """A second SIGTERM or SIGINT (``_HURRY_AFTER`` or more after the first):
    remove the sockets and exit at once.

    The first signal's stop waits for calls and hand-offs in flight (a
    hand-off check-out whose reply the client never reads holds it until
    the reply's deadline, ``[handoff] timeout``); the second waits for
    nothing. Exiting closes every fd the daemon holds, pooled enclaves
    included; under systemd, enclaves still queued for its fd store are
    lost. Like the first handler this one takes no lock, so it writes its
    log line with os.write, not structlog.
    """
    for path in sockets:
        try:
            unlink_socket(path)
        except OSError:
            pass
    event = {"signal": signal.Signals(signum).name,
             "event": "epm_stopped_at_once", "level": "warning",
             "timestamp": datetime.datetime.now(datetime.timezone.utc)
             .isoformat().replace("+00:00", "Z")}
    line = (json.dumps(event) if not os.isatty(2)
            else " ".join(f"{k}={v}" for k, v in event.items()))
    try:
        os.write(2, line.encode() + b"\n")
    finally:
        os._exit(128 + signum)


def _open_records(cfg):
    """Open the bundle caches' database and make it agree with the disk."""
    os.makedirs(cfg.root, mode=0o755, exist_ok=True)
    try:
        records = Records(cfg.db_path, cfg.db_timeout)
    except sqlite3.Error as e:
        raise StartupError(f"cannot open the database {cfg.db_path}: {e}") from None
    reconcile(cfg.root, records)
    return records


def _pool_capacity(cfg):
    """Raise RLIMIT_NOFILE as far as allowed; return the pool's total limit.

    Every pooled enclave is an open fd, so the limit bounds the pool.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = _NR_OPEN_FALLBACK
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            logger.warning("nofile_not_raised", soft=soft, hard=hard, reason=str(e))
    nofile = hard if soft == resource.RLIM_INFINITY else soft
    capacity = min(cfg.max_total, max(nofile - FD_RESERVE, 1))
    if capacity < cfg.max_total:
        logger.warning("pool_capacity_limited_by_nofile", nofile=nofile,
                       configured=cfg.max_total, max_total=capacity)
    logger.info("epm_capacity", nofile=nofile, max_total=capacity,
                max_per_identity=min(cfg.max_per_identity, capacity))
    return capacity


# RLIMIT_NOFILE can be unlimited only in name: the kernel caps it at
# fs.nr_open, whose default is this.
_NR_OPEN_FALLBACK = 1048576


def _prepare_runtime_dir(directory, uid, gid):
    """Create the socket directory for root and ``gid`` only.

    A directory that exists is the operator's: it is left as it is, with a
    warning when anybody may enter it.
    """
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        mode = os.stat(directory).st_mode
        if mode & 0o007:
            logger.warning("runtime_dir_open_to_all", path=directory,
                           mode=oct(mode & 0o7777))
        return
    except FileNotFoundError:
        os.makedirs(os.path.dirname(directory), mode=0o755, exist_ok=True)
        return _prepare_runtime_dir(directory, uid, gid)
    # Owner first, then the mode: until both are set only root may enter.
    if uid is not None or gid is not None:
        os.chown(directory, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(directory, RUNTIME_DIR_MODE)


def _prepare_socket_path(path):
    """Make room for a socket at ``path``, whose directory exists."""
    if is_served(path):
        raise StartupError(f"another daemon is serving {path}")
    # A socket left by a daemon that died: ours to replace.
    unlink_socket(path)
    if os.path.lexists(path):
        raise StartupError(f"{path} exists and is not a socket")


def _remove_stale_legacy_sockets(directory):
    """Remove per-ID legacy sockets that nobody listens on any more.

    A daemon or client killed mid hand-off leaves ``<dir>/<ID>`` behind, and
    every later SaveCache of that ID would fail with ALREADY_EXISTS. Only
    sockets named like an ID whose connect is refused are removed: a live
    listener (a client waiting for a check-out) is left alone.
    """
    try:
        names = os.listdir(directory)
    except OSError as e:
        logger.warning("socket_dir_unreadable", path=directory, reason=e.strerror)
        return
    for name in names:
        path = os.path.join(directory, name)
        if not is_id(name) or not _is_refused_socket(path):
            continue
        try:
            os.unlink(path)
        except OSError as e:
            logger.warning("stale_legacy_socket_kept", path=path, reason=e.strerror)
            continue
        logger.info("stale_legacy_socket_removed", path=path)


def _is_refused_socket(path):
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX,
                       socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as e:
            return e.errno == errno.ECONNREFUSED
    return False


def _notify(state):
    """Tell systemd (Type=notify) our state; a no-op outside systemd."""
    try:
        systemd.notify(state)
    except OSError as e:
        logger.warning("notify_failed", reason=str(e))


def _accepting(handoff):
    """True while the hand-off server's accept loop runs.

    HandoffServer has no public way to say so yet (handoff.py belongs to a
    change in flight, which renames its thread); until it gains
    ``accepting()``, its thread is looked at directly.
    """
    accepting = getattr(handoff, "accepting", None)
    if callable(accepting):
        return accepting()
    for name in ("_acceptor", "_thread"):
        thread = getattr(handoff, name, None)
        if thread is not None:
            return thread.is_alive()
    return False


def _start_watchdog(handoff, grpc_address):
    """Ping systemd's watchdog while both sockets serve; None when not asked."""
    interval = systemd.watchdog_interval()
    if interval is None:
        return None
    import grpc
    from epm_api import v1alpha1_pb2 as pb
    from epm_api import v1alpha1_pb2_grpc as pb_grpc
    channel = grpc.insecure_channel(f"unix:{grpc_address}")
    stub = pb_grpc.EnclavePoolManagerStub(channel)

    def alive():
        # The hand-off socket serves while its accept loop runs; the gRPC
        # server serves when a call through its socket answers in time.
        if not _accepting(handoff):
            return False
        try:
            # A busy host may answer slowly; a late ping is still in time
            # when WatchdogSec is well above the probe's timeout.
            return stub.Healthz(pb.HealthzRequest(), timeout=_PROBE_TIMEOUT).ok
        except grpc.RpcError:
            return False

    watchdog = systemd.Watchdog(interval, alive)
    watchdog.start()
    logger.info("watchdog_started", interval_s=interval)
    return watchdog


if __name__ == "__main__":
    sys.exit(main())
