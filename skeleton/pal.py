"""The skeleton's PAL life cycle as a Python API.

rune drives a PAL in this order: ``init``, then per process
``create_process`` and ``exec`` (API v1: ``run``), ``kill`` for signals, and
``destroy``. The C libraries ``liberpal-skeleton-v{1,2,3}.so`` wrap this
class (``skeleton.capi``).

At ``init`` the enclave comes from the epm pool when one of the same
identity is available (an instant launch), and is built otherwise. Either
way the pool holds it for this container while it runs, and ``destroy``
makes it available to the next one (save-final), as the published runtime
does: a pooled enclave is checked out with hold, so it never leaves the
pool, and a built one is checked in right away. The argument ``no-epm``
keeps the daemon out of it.

Only the hand-off socket is used here, never gRPC: the launch path must not
import grpc (about 90 ms per container start) nor start its threads, which a
forked workload would inherit.
"""

import errno
import os
import signal
import time

from epm_client import Client, EpmError, DaemonUnavailable, LayoutEntry
from skeleton import errors
from skeleton.backends import get_backend
from skeleton.enclave import Enclave
from skeleton.image import IMAGE_NAME, SIGSTRUCT_NAME, check_host, load_image
from skeleton.log import get_logger
from skeleton.measure import tcs_as_added
from skeleton.structs import ATTR_DEBUG, PAGE_SIZE, TCS

log = get_logger("skeleton.pal")

# The subtype the published rune uses for the skeleton's pool.
SUBTYPE = "skeleton-0.0.0"

# Arguments the published runtimes accept (DESIGN §6); ours are
# "epm-socket=" and "subtype=". Anything else is refused: a misspelt "sim" or
# "no-epm" would otherwise change what the container gets without a word.
_FLAGS = ("debug", "no-epm", "sim", "no-sgx-flc", "backend-kvm")
_KEYS = ("kvm-kernel", "kvm-rootfs", "kvm-init", "attester", "verifier", "tls",
         "crypto", "epm-socket", "subtype")
# Where rune takes the arguments from when no annotation gives them (DESIGN §6).
ARGS_ENV = "ENCLAVE_RUNTIME_ARGS"


class PalError(Exception):
    """A PAL call failed; ``errno`` is what the C ABI returns, negated."""

    def __init__(self, err, message):
        super().__init__(message)
        self.errno = err


def parse_args(text):
    """Split PAL arguments on commas and spaces into flags and key=values.

    Returns ``(flags, values)``; raises PalError(EINVAL) naming the first
    argument that is not a known one, and listing those.
    """
    flags, values = set(), {}
    for word in (text or "").replace(",", " ").split():
        key, sep, value = word.partition("=")
        if sep and key in _KEYS:
            values[key] = value
        elif not sep and word in _FLAGS:
            flags.add(word)
        else:
            known = ", ".join(_FLAGS + tuple(f"{k}=" for k in _KEYS))
            raise PalError(errno.EINVAL, f"unknown PAL argument {word!r}; known "
                           f"arguments: {known}")
    return flags, values


# The size of a REPORT and of a TARGETINFO (SDM Vol. 3D, 38.16 and 38.17).
REPORT_SIZE = 432
TARGETINFO_SIZE = 512
REPORT_DATA_SIZE = 64


class Pal:
    """One container's enclave runtime: at most one enclave at a time.

    ``spawn(enclave, wait_s, stdio)`` starts a workload process and returns
    its pid; the default forks this interpreter. The C libraries pass one
    whose child runs no Python at all (``skeleton.capi``).
    """

    def __init__(self, spawn=None):
        self.enclave = None
        self.source = None
        self.init_ms = None
        self._spawn = spawn or _fork_workload
        self._client = None
        self._pool_id = None
        self._children = set()

    def init(self, args="", image_dir=None, environ=None, enclave_fd=None,
             enclave_addr=None):
        """Obtain, map and initialize the container's enclave.

        ``args`` are the PAL arguments, ``$ENCLAVE_RUNTIME_ARGS`` of
        ``environ`` when empty. ``image_dir`` holds ``encl.bin`` and
        ``encl.ss`` (default: the working directory). ``enclave_fd`` and ``enclave_addr`` (API v3) are
        an enclave the host already holds and its base address: it is used
        as it is, nothing is built or checked out, and ``destroy`` leaves the
        fd to the host. Sets ``source`` to "pool", "built" or "host". Raises
        PalError when no enclave can be had.
        """
        started = time.perf_counter()
        if self.enclave is not None:
            raise PalError(errno.EEXIST, "pal_init called twice")
        environ = os.environ if environ is None else environ
        flags, values = parse_args(args or environ.get(ARGS_ENV, ""))
        backend = "sim" if ("sim" in flags or environ.get("SGX_MODE") == "SIM") \
            else "sgx"
        subtype = values.get("subtype", SUBTYPE)
        image, oentry = _load_image(image_dir or os.getcwd())
        host_warnings = _check_host(image)
        identity = image.identity(backend)
        if "debug" in flags:
            # A debug launch sets SECS.ATTRIBUTES.DEBUG, which is part of
            # what the pool matches: debug enclaves never serve others.
            identity = identity._replace(
                attributes=identity.attributes | ATTR_DEBUG)

        if enclave_fd is not None:
            self.enclave = _host_enclave(image, oentry, identity, enclave_fd,
                                         enclave_addr)
            self.source = "host"
        else:
            if "no-epm" not in flags:
                self._client = Client(values.get("epm-socket"))
                self.enclave = self._check_out(subtype, identity, image, oentry)
            if self.enclave is None:
                self.enclave = _build(image, backend, debug="debug" in flags)
                self.source = "built"
                if self._client is not None:
                    self._check_in(subtype)
            else:
                self.source = "pool"

        self.init_ms = (time.perf_counter() - started) * 1000
        # Given once an enclave runs, so that a failed init says one thing.
        for warning in set(host_warnings) - _host_warnings_given:
            _host_warnings_given.add(warning)
            log.warning("image_host_warning", detail=warning)
        log.debug("pal_initialized", source=self.source, backend=backend,
                  size=identity.size, took_ms=round(self.init_ms, 3))

    def _check_out(self, subtype, identity, image, oentry):
        """A pooled enclave, mapped and held for this container, or None."""
        try:
            got = self._client.check_out(subtype, identity, hold=True)
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
        enclave = _adopt(got.fd, got.layout, got.identity, image, oentry)
        try:
            enclave.map()
            if enclave.backend == "sim":
                enclave.body_address()  # its entry record is where the image's is
        except errors.MappingConflict as e:
            # Our address space already uses part of the enclave's range:
            # the enclave is still good for another container, so return it.
            log.warning("enclave_mapping_conflict", error=str(e), action="building")
            self._give_back(enclave, got.pool_id, discard=False)
            return None
        except errors.SkeletonError as e:
            # Not what its identity promised (no entry record, a mapping the
            # kernel refuses): it must not go back to the pool.
            log.warning("pooled_enclave_unusable", id=got.pool_id, error=str(e),
                        action="discarding it and building")
            self._give_back(enclave, got.pool_id, discard=True)
            return None
        self._pool_id = got.pool_id
        return enclave

    def _give_back(self, enclave, pool_id, discard):
        """Make a held enclave we do not use available again, or discard it."""
        try:
            self._client.save_final(pool_id, discard=discard)
        except EpmError as e:
            # It stays held until this process ends; the daemon discards it then.
            log.warning("enclave_give_back_failed", id=pool_id, error=str(e))
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
        pid = self._spawn(enclave, _wait_seconds(list(argv)), tuple(stdio))
        self._children.add(pid)
        return pid

    def run(self, path, argv=(), stdio=(0, 1, 2)):
        """Run the workload in this process (API v1); return its exit value."""
        enclave = self._require_enclave("pal_exec")
        return _workload(enclave, _wait_seconds(list(argv)), stdio)

    def exec(self, pid):
        """Wait for the child ``pid``; return its exit value."""
        self._require_enclave("pal_exec")
        if pid not in self._children:
            raise PalError(errno.ECHILD, f"pid {pid} is not a process of this PAL")
        _, status = os.waitpid(pid, 0)
        self._children.discard(pid)
        return os.waitstatus_to_exitcode(status)

    def kill(self, pid, sig):
        """Send ``sig`` to our child ``pid``, or to all of them for -1.

        rune forwards every signal it catches, its own SIGCHLD included, as
        ``kill(-1, sig)``: only this PAL's children are ever signalled.
        """
        self._require_enclave("pal_kill")
        targets = set(self._children) if pid == -1 else {pid}
        if pid != -1 and pid not in self._children:
            raise PalError(errno.ESRCH, f"pid {pid} is not a process of this PAL")
        for target in targets:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                self._children.discard(target)

    def get_local_report(self, targetinfo, report_len,
                         report_data=bytes(REPORT_DATA_SIZE)):
        """EREPORT for ``targetinfo``; returns the REPORT's bytes (API v3).

        Raises PalError(EINVAL) when ``targetinfo`` is not a TARGETINFO or
        ``report_len`` cannot hold a REPORT.
        """
        enclave = self._require_enclave("pal_get_local_report")
        if len(targetinfo) != TARGETINFO_SIZE:
            raise PalError(errno.EINVAL, f"targetinfo is {len(targetinfo)} bytes, "
                           f"expected {TARGETINFO_SIZE}")
        if report_len < REPORT_SIZE:
            raise PalError(errno.EINVAL, f"report buffer is {report_len} bytes, "
                           f"a REPORT needs {REPORT_SIZE}")
        try:
            return bytes(enclave.report(bytes(targetinfo), bytes(report_data)))
        except errors.SkeletonError as e:
            raise PalError(errno.EINVAL, str(e)) from e

    def destroy(self):
        """Unmap the enclave and return it to the pool (or close it)."""
        enclave = self._require_enclave("pal_destroy")
        enclave.unmap()
        if self._pool_id is not None:
            try:
                self._client.save_final(self._pool_id)
            except EpmError as e:
                log.warning("epm_save_final_failed", id=self._pool_id, error=str(e))
        if self.source != "host":
            enclave.close()
        if self._client is not None:
            self._client.close()
        self.enclave = self._client = self._pool_id = None

    def _require_enclave(self, call):
        if self.enclave is None:
            raise PalError(errno.EINVAL, f"{call} called before pal_init")
        return self.enclave


def _adopt(fd, layout, identity, image, oentry):
    """Wrap an enclave built elsewhere from ``image``, not yet mapped.

    The SIGSTRUCT lets it produce reports; OENTRY comes from the image
    because an sgx enclave's TCS page cannot be read.
    """
    return Enclave.adopt(fd, layout, identity, sigstruct=image.sigstruct,
                         oentry=oentry)


# Parsed images by directory and by what the stat of both files says (inode,
# size, mtime, ctime): a runtime that launches many containers of one image
# reads and parses it once, and a rewritten or re-signed file is read again.
# A pool launch is otherwise about 0.3 ms of reading and parsing the image.
_images = {}
_IMAGES_KEPT = 16


def _load_image(directory):
    """``(image, oentry)`` for the image in ``directory``; raises PalError."""
    directory = os.path.abspath(directory)
    try:
        key = (directory,) + tuple(
            _stamp(os.stat(os.path.join(directory, name)))
            for name in (IMAGE_NAME, SIGSTRUCT_NAME))
    except OSError:
        key = None  # load_image names the missing file
    loaded = _images.get(key)
    if loaded is not None:
        return loaded
    try:
        image = load_image(directory)
    except errors.ImageError as e:
        raise PalError(e.errno, str(e)) from e
    loaded = image, TCS.get(tcs_as_added(image.data, image.geometry), "oentry")
    if key is not None:
        if len(_images) >= _IMAGES_KEPT:
            _images.clear()
        _images[key] = loaded
    return loaded


def _stamp(st):
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# Warnings about the image that every launch would repeat are given once.
_host_warnings_given = set()


def _check_host(image):
    """Refuse an image this host cannot run as signed; return the warnings."""
    try:
        return check_host(image)
    except errors.ImageError as e:
        raise PalError(errno.EPERM, str(e)) from e


def _host_enclave(image, oentry, identity, fd, base):
    """Map an enclave the host passed (API v3) at ``base``.

    Its layout is the one the sim backend gives an enclave of this image:
    the TCS page read-write, then the rest of the mmap size read-write-
    execute, from ``base`` plus the image's encl_offset. The sim backend's
    build is the only place that layout is written down, so it is repeated
    here; the two must change together.
    """
    if base % identity.size:
        raise PalError(errno.EINVAL, f"enclave address {base:#x} is not aligned "
                       f"to the enclave size {identity.size:#x}")
    start = base + image.geometry.encl_offset
    layout = [
        LayoutEntry(start, PAGE_SIZE, read=True, write=True, share=True),
        LayoutEntry(start + PAGE_SIZE, image.geometry.mmap_size - PAGE_SIZE,
                    read=True, write=True, execute=True, share=True),
    ]
    enclave = _adopt(fd, layout, identity, image, oentry)
    try:
        enclave.map()
    except errors.SkeletonError as e:
        raise PalError(errno.EINVAL, f"cannot map the host's enclave: {e}") from e
    return enclave


def _build(image, backend, debug):
    try:
        return get_backend(backend).build(image, debug=debug)
    except errors.BackendError as e:
        how = "" if backend == "sim" else (" (to simulate: the PAL argument `sim`, "
                                           "or SGX_MODE=SIM)")
        raise PalError(errno.ENODEV, f"{e}{how}") from e
    except errors.EinitError as e:
        raise PalError(errno.EPERM, str(e)) from e
    except errors.SkeletonError as e:
        raise PalError(errno.EINVAL, str(e)) from e


def entry_address(enclave):
    """The address a forked workload calls to run ECALL 0 in the enclave.

    In sim that is the enclave's C body (``Enclave.body_address``), called as
    ``void body(uint64_t op, void *buf)``: the entry stub at OENTRY needs
    hardware for its ENCLU. Raises PalError when the enclave's code cannot be
    called in this process; on the sgx backend a workload would have to EENTER
    through the vDSO, which the workload path does not do yet.
    """
    if enclave.backend != "sim":
        raise PalError(errno.ENOSYS, f"entering an enclave on the {enclave.backend} "
                       "backend from a workload needs EENTER, which the workload "
                       "path does not do yet")
    try:
        return enclave.body_address()
    except errors.SkeletonError as e:
        raise PalError(errno.EFAULT, str(e)) from None


def _wait_seconds(argv):
    """N of ``wait_timeout N`` in the workload's argv, else 0."""
    if "wait_timeout" not in argv:
        return 0
    i = argv.index("wait_timeout")
    try:
        return max(0, int(argv[i + 1]))
    except (IndexError, ValueError):
        return 0


def _workload(enclave, wait_s, stdio):
    """The workload: greet from the enclave, wait, report; returns 0 or 1."""
    try:
        greeting = enclave.ecall(0)
        os.write(stdio[1], f"{greeting}\n".encode())
        time.sleep(wait_s)
        os.write(stdio[2], b"the skeleton workload ran successfully\n")
        return 0
    except Exception as e:
        try:
            os.write(stdio[2], f"skeleton workload failed: {e}\n".encode())
        except OSError:
            pass
        return 1


def _fork_workload(enclave, wait_s, stdio):
    """Fork this interpreter and run the workload in the child.

    The child runs Python after fork, so this is for Python callers (tests,
    the demo); the C libraries spawn a child that runs no Python.
    """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = _workload(enclave, wait_s, stdio)
        finally:
            os._exit(code)
    return pid
