"""The skeleton's PAL life cycle as a Python API.

rune drives a PAL in this order: ``init``, then per process
``create_process`` and ``exec``, ``kill`` for signals, and ``destroy``. The
C libraries ``liberpal-skeleton-v{1,2,3}.so`` wrap this class.

At ``init`` the enclave comes from the epm pool when one of the same
identity is available (an instant launch), and is built otherwise. Either
way it is checked in to the pool right away, held for this container, and
``destroy`` makes it available to the next one (SaveFinalCache), as the
published runtime does. The argument ``no-epm`` keeps the daemon out of it.
"""

import errno
import os
import signal
import time

import structlog

from epm_client import Client, EpmError, DaemonUnavailable
from skeleton import errors
from skeleton.enclave import Enclave
from skeleton.image import load_image

log = structlog.get_logger("skeleton.pal")

# The subtype the published rune uses for the skeleton's pool.
SUBTYPE = "skeleton-0.0.0"

# Arguments the published runtimes accept; ours are "epm-socket=" and
# "subtype=". Anything else is ignored with a debug event.
_FLAGS = {"debug", "no-epm", "sim", "no-sgx-flc", "backend-kvm"}
_KEYS = {"kvm-kernel", "kvm-rootfs", "kvm-init", "attester", "verifier", "tls",
         "crypto", "epm-socket", "subtype"}


class PalError(Exception):
    """A PAL call failed; ``errno`` is what the C ABI returns, negated."""

    def __init__(self, err, message):
        super().__init__(message)
        self.errno = err


def parse_args(text):
    """Split PAL arguments on commas and spaces into flags and key=values."""
    flags, values = set(), {}
    for word in (text or "").replace(",", " ").split():
        key, sep, value = word.partition("=")
        if sep and key in _KEYS:
            values[key] = value
        elif not sep and word in _FLAGS:
            flags.add(word)
        else:
            log.debug("pal_argument_ignored", argument=word)
    return flags, values


class Pal:
    """One container's enclave runtime: at most one enclave at a time."""

    def __init__(self):
        self.enclave = None
        self.source = None
        self.init_ms = None
        self._client = None
        self._pool_id = None
        self._children = set()

    def init(self, args="", image_dir=None, environ=None):
        """Obtain, map and initialize the container's enclave.

        ``image_dir`` holds ``encl.bin`` and ``encl.ss`` (default: the
        working directory). Sets ``source`` to "pool" or "built". Raises
        PalError when no enclave can be had.
        """
        started = time.perf_counter()
        if self.enclave is not None:
            raise PalError(errno.EEXIST, "pal_init called twice")
        environ = os.environ if environ is None else environ
        flags, values = parse_args(args)
        backend = "sim" if ("sim" in flags or environ.get("SGX_MODE") == "SIM") \
            else "sgx"
        subtype = values.get("subtype", SUBTYPE)
        try:
            image = load_image(image_dir or os.getcwd())
        except errors.ImageError as e:
            raise PalError(errno.ENOENT, str(e)) from e
        identity = image.identity(backend)

        if "no-epm" not in flags:
            self._client = Client(values.get("epm-socket"))
            self.enclave = self._check_out(subtype, identity)
        if self.enclave is None:
            self.enclave = _build(image, backend)
            self.source = "built"
        else:
            self.source = "pool"
        if self._client is not None:
            self._check_in(subtype)

        self.init_ms = (time.perf_counter() - started) * 1000
        log.info("pal_initialized", source=self.source, backend=backend,
                 size=identity.size, took_ms=round(self.init_ms, 3))

    def _check_out(self, subtype, identity):
        try:
            got = self._client.check_out(subtype, identity)
        except DaemonUnavailable as e:
            log.warning("epm_unreachable", error=str(e), action="building")
            self._client.close()
            self._client = None
            return None
        except EpmError as e:
            log.warning("epm_check_out_failed", error=str(e), action="building")
            return None
        if got is None:
            return None
        enclave = Enclave.adopt(got.fd, got.layout, got.identity)
        try:
            enclave.map()
        except errors.MappingConflict as e:
            # Our address space already uses part of the enclave's range:
            # the enclave is still good for another container, so return it.
            log.warning("enclave_mapping_conflict", error=str(e), action="building")
            self._give_back(enclave, subtype)
            return None
        return enclave

    def _give_back(self, enclave, subtype):
        try:
            pool_id = self._client.check_in(enclave.fd, subtype, enclave.layout,
                                            enclave.identity)
            self._client.save_final(pool_id)
        except EpmError as e:
            log.warning("enclave_give_back_failed", error=str(e))
        finally:
            enclave.close()

    def _check_in(self, subtype):
        try:
            self._pool_id = self._client.check_in(
                self.enclave.fd, subtype, self.enclave.layout, self.enclave.identity)
        except EpmError as e:
            log.warning("epm_check_in_failed", error=str(e))
            self._client.close()
            self._client = None

    def create_process(self, path, argv=(), env=None, stdio=(0, 1, 2)):
        """Start the workload in a child; return its pid.

        The child enters the enclave (ECALL 0) and writes the greeting to the
        given stdout; with ``wait_timeout N`` in argv it then sleeps N
        seconds, so that ``kill`` can be exercised.
        """
        enclave = self._require_enclave("pal_create_process")
        pid = os.fork()
        if pid == 0:
            _run_workload(enclave, list(argv), stdio)
        self._children.add(pid)
        return pid

    def exec(self, pid):
        """Wait for the child ``pid``; return its exit value."""
        self._require_enclave("pal_exec")
        if pid not in self._children:
            raise PalError(errno.ECHILD, f"pid {pid} is not a process of this PAL")
        _, status = os.waitpid(pid, 0)
        self._children.discard(pid)
        return os.waitstatus_to_exitcode(status)

    def kill(self, pid, sig):
        """Send ``sig`` to our child ``pid``, or to all of them for -1."""
        self._require_enclave("pal_kill")
        targets = set(self._children) if pid == -1 else {pid}
        if pid != -1 and pid not in self._children:
            raise PalError(errno.ESRCH, f"pid {pid} is not a process of this PAL")
        for target in targets:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                self._children.discard(target)

    def destroy(self):
        """Unmap the enclave and return it to the pool (or close it)."""
        enclave = self._require_enclave("pal_destroy")
        enclave.unmap()
        if self._pool_id is not None:
            try:
                self._client.save_final(self._pool_id)
            except EpmError as e:
                log.warning("epm_save_final_failed", id=self._pool_id, error=str(e))
        enclave.close()
        if self._client is not None:
            self._client.close()
        self.enclave = self._client = self._pool_id = None

    def _require_enclave(self, call):
        if self.enclave is None:
            raise PalError(errno.EINVAL, f"{call} called before pal_init")
        return self.enclave


def _build(image, backend):
    from skeleton.backends import sim
    if backend != "sim":
        raise PalError(errno.ENODEV, "the sgx backend is not built yet; "
                       "pass the argument 'sim' or set SGX_MODE=SIM")
    try:
        return sim.build(image)
    except errors.EinitError as e:
        raise PalError(errno.EPERM, str(e)) from e
    except errors.SkeletonError as e:
        raise PalError(errno.EINVAL, str(e)) from e


def _run_workload(enclave, argv, stdio):
    """The forked child's whole life; never returns."""
    code = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        greeting = enclave.ecall(0)
        os.write(stdio[1], f"{greeting}\n".encode())
        if "wait_timeout" in argv:
            i = argv.index("wait_timeout")
            time.sleep(int(argv[i + 1]) if i + 1 < len(argv) else 0)
        os.write(stdio[2], b"the skeleton workload ran successfully\n")
    except BaseException as e:
        try:
            os.write(stdio[2], f"skeleton workload failed: {e}\n".encode())
        finally:
            code = 1
    os._exit(code)
