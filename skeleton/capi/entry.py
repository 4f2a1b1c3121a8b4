"""The PAL entry point: the Python side of ``liberpal-skeleton-v<N>.so``.

The library's constructor runs ``bind`` in its embedded interpreter, when
rune loads it and before rune pivots into the container's root: everything
the launch path imports is imported here, because afterwards the host's
files may be out of sight. Each C call becomes one ``Pal`` call; a failure
is one line on stderr and a negative errno.

Logging is configured here, once: a small stderr writer, unless the log
level asks for debug and structlog could be imported at load time.
"""

import errno
import functools
import os

from skeleton import log as pal_log
from skeleton.pal import Pal, PalError, entry_address

# Modules the launch path imports lazily, loaded now while they are visible.
_LAUNCH_MODULES = ("skeleton.backends.sim", "skeleton.report",
                   "skeleton.backends.sgx")
_DEBUG = pal_log.LEVELS["debug"]
LOG_LEVEL_ENV = "ENCLAVE_RUNTIME_LOGLEVEL"

log = pal_log.get_logger("skeleton.capi")
_state = {}


def bind(ffi, lib, version):
    """Attach the PAL's functions to the library's extern "Python" slots."""
    _preload()
    _configure_logging(os.environ.get(LOG_LEVEL_ENV), at_load=True)
    pal = Pal(spawn=functools.partial(_spawn, lib))
    _state.update(ffi=ffi, lib=lib, version=version, pal=pal)

    @ffi.def_extern(error=0)
    def _epm_boot(got_version):
        return 1 if got_version == version else 0

    @ffi.def_extern(error=-errno.EIO)
    @_c_call("pal_init")
    def _epm_init(args, log_level, fd, addr):
        level = _string(ffi, log_level)
        if level:
            _configure_logging(level)
        host = fd != -1 and addr != 0
        pal.init(_string(ffi, args), enclave_fd=fd if host else None,
                 enclave_addr=addr if host else None)
        return 0

    @ffi.def_extern(error=-errno.EIO)
    @_c_call("pal_exec")
    def _epm_run(path, argv, stdio, exit_code):
        _need(ffi, exit_code, "exit_code")
        fds = _stdio(ffi, stdio)
        exit_code[0] = pal.run(_string(ffi, path), _strings(ffi, argv), fds)
        return 0

    @ffi.def_extern(error=-errno.EIO)
    @_c_call("pal_create_process")
    def _epm_create_process(args):
        _need(ffi, args, "args")
        _need(ffi, args.pid, "args->pid")
        pid = pal.create_process(_string(ffi, args.path), _strings(ffi, args.argv),
                                 _strings(ffi, args.env), _stdio(ffi, args.stdio))
        args.pid[0] = pid
        return 0

    @ffi.def_extern(error=-errno.EIO)
    @_c_call("pal_exec")
    def _epm_exec(pid, exit_value):
        _need(ffi, exit_value, "exit_value")
        exit_value[0] = pal.exec(pid)
        return 0

    @ffi.def_extern(error=-errno.EIO)
    @_c_call("pal_kill")
    def _epm_kill(pid, sig):
        pal.kill(pid, sig)
        return 0

    @ffi.def_extern(error=-errno.EIO)
    @_c_call("pal_get_local_report")
    def _epm_get_local_report(targetinfo, targetinfo_len, report, report_len):
        _need(ffi, targetinfo, "targetinfo")
        _need(ffi, report, "report")
        _need(ffi, report_len, "report_len")
        if targetinfo_len < 0:
            raise PalError(errno.EINVAL, f"targetinfo_len is {targetinfo_len}")
        got = pal.get_local_report(ffi.buffer(targetinfo, targetinfo_len)[:],
                                   report_len[0])
        ffi.memmove(report, got, len(got))
        report_len[0] = len(got)
        return 0

    @ffi.def_extern(error=-errno.EIO)
    @_c_call("pal_destroy")
    def _epm_destroy():
        pal.destroy()
        return 0


def _c_call(name):
    """Turn a PalError (or any failure) into one stderr line and -errno."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args):
            try:
                return fn(*args)
            except PalError as e:
                log.error(f"{name}_failed", error=errno.errorcode.get(e.errno, e.errno),
                          reason=str(e))
                return -e.errno
            except Exception as e:
                log.error(f"{name}_failed", error="EIO", reason=f"{type(e).__name__}: {e}")
                return -errno.EIO
        return call
    return wrap


def _spawn(lib, enclave, wait_s, stdio):
    """Pal's spawn: fork a child that runs the workload in C, no Python."""
    pid = lib.epm_spawn_workload(entry_address(enclave), stdio[1], stdio[2], wait_s)
    if pid < 0:
        raise PalError(-pid, f"cannot fork the workload: {os.strerror(-pid)}")
    return pid


def _preload():
    import importlib
    for name in _LAUNCH_MODULES:
        importlib.import_module(name)
    # The sim backend's host facts, read while the host's files are visible:
    # XCR0 for ECREATE's check, libcrypto for EINIT's and EREPORT's, and the
    # secret that keys local reports. All are cached; a failure here shows
    # again, with its reason, when used.
    from skeleton import cpu, openssl, report
    try:
        cpu.xcr0()
        openssl.load()
        report.load_secret()
    except Exception as e:
        log.debug("pal_preload_incomplete", error=str(e))


def _configure_logging(level_name, at_load=False):
    """stderr writer at the level, or structlog when debug is asked at load."""
    level = pal_log.level_number(level_name)
    if level <= _DEBUG and (at_load or "structlog" in _state):
        _state["structlog"] = True
        import structlog
        structlog.configure(
            processors=[structlog.processors.add_log_level,
                        structlog.processors.TimeStamper(fmt="iso"),
                        structlog.dev.ConsoleRenderer(colors=False)],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.PrintLoggerFactory(
                open(2, "w", buffering=1, closefd=False)))
        pal_log.use_structlog()
    else:
        pal_log.use_stderr(level)


def _need(ffi, pointer, name):
    if pointer == ffi.NULL:
        raise PalError(errno.EINVAL, f"{name} is NULL")


def _string(ffi, pointer):
    return "" if pointer == ffi.NULL else ffi.string(pointer).decode(errors="replace")


def _strings(ffi, array, limit=4096):
    """A NULL-terminated char * array as a list (bounded, for a bad array)."""
    if array == ffi.NULL:
        return []
    out = []
    for i in range(limit):
        if array[i] == ffi.NULL:
            break
        out.append(ffi.string(array[i]).decode(errors="replace"))
    return out


def _stdio(ffi, stdio):
    if stdio == ffi.NULL:
        return (0, 1, 2)
    return (stdio.stdin, stdio.stdout, stdio.stderr)
