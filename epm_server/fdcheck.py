"""What kind of file a descriptor is, and whether it may enter the pool.

A client chooses which fd it sends, so the daemon looks at the fd itself:
a pooled fd is later mapped by another container, which must get enclave
memory and nothing else (a pipe, a socket, a writable file, fd 0 sent by
mistake by rune's published client).
"""

import ctypes
import fcntl
import os
import platform
import stat

from epm_server.errors import InvalidArgument, shown

# memfd_create(2) names appear in /proc/self/fd as "/memfd:<name> (deleted)".
_MEMFD_PREFIX = "/memfd:"
SGX_DEVICE = "/dev/sgx_enclave"
# fcntl(2) F_GET_SEALS; the fcntl module names it only on some builds.
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = 0x0002
_F_SEAL_GROW = 0x0004
# The consumer maps exactly identity.size bytes: the size must never change.
REQUIRED_SEALS = _F_SEAL_SHRINK | _F_SEAL_GROW

_KINDS = (
    (stat.S_ISFIFO, "a pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISBLK, "a block device"),
)


# kcmp(2) KCMP_FILE: whether two descriptors refer to one open file.
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_KCMP_FILE = 0
_libc = ctypes.CDLL(None, use_errno=True)


def file_key(fd):
    """Return ``(st_dev, st_ino, is_device)`` of ``fd`` for the pool's index.

    Two memfds are the same memory exactly when their inodes are; every
    enclave opened from /dev/sgx_enclave shares the device's inode, so for
    a device the key only narrows the search and same_open_file decides.
    """
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, stat.S_ISCHR(st.st_mode)


def same_open_file(fd, other):
    """Return True when the daemon's ``fd`` and ``other`` are one open file.

    Uses kcmp(2) on our own process; where it is missing or forbidden (a
    seccomp profile), returns False: two check-ins of one enclave device fd
    are then not told apart.
    """
    if _SYS_KCMP is None:
        return False
    pid = os.getpid()
    return _libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, fd, other) == 0


def describe(fd):
    """Return a short description of ``fd`` for error messages and logs.

    Raises InvalidArgument when ``fd`` is not an open descriptor.
    """
    mode, link = _inspect(fd)
    return _describe(mode, link)


def check_enclave_fd(fd, identity):
    """Check that ``fd`` holds an enclave of ``identity``'s backend and size.

    ``identity`` None (a published client names none) accepts either backend,
    without a size check. Raises InvalidArgument naming what the fd is.
    """
    mode, link = _inspect(fd)
    backend = identity.backend if identity is not None else None
    if link.startswith(_MEMFD_PREFIX) and stat.S_ISREG(mode) and backend != "sgx":
        _check_memfd(fd, identity)
        return
    if stat.S_ISCHR(mode) and link == SGX_DEVICE and backend != "sim":
        return
    wanted = {"sim": "a sealed memfd", "sgx": SGX_DEVICE}.get(
        backend, f"a sealed memfd or {SGX_DEVICE}")
    raise InvalidArgument(f"enclave fd: expected {wanted}, got "
                          f"{_describe(mode, link)}")


def _check_memfd(fd, identity):
    # Seals first, size after: the sender holds the fd too, and a size read
    # before the seals were checked could have changed in between.
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise InvalidArgument(f"enclave fd: memfd seals {seals:#x} lack "
                              "F_SEAL_SHRINK|F_SEAL_GROW")
    size = os.fstat(fd).st_size
    if identity is not None and size != identity.size:
        raise InvalidArgument(f"enclave fd: memfd of {size} bytes, identity.size "
                              f"is {identity.size}")
    if size == 0:
        raise InvalidArgument("enclave fd: memfd is empty")


def _inspect(fd):
    try:
        mode = os.fstat(fd).st_mode
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise InvalidArgument(f"enclave fd: {fd} is not usable: {e.strerror}") \
            from None
    return mode, link


def _describe(mode, link):
    # A memfd's name and a file's path are the client's choice: quoted, so
    # that a newline or an escape sequence in them cannot break a message.
    if link.startswith(_MEMFD_PREFIX):
        return f"memfd {shown(link[len(_MEMFD_PREFIX):], quoted=True)}"
    for test, kind in _KINDS:
        if test(mode):
            return kind
    if stat.S_ISCHR(mode):
        return f"character device {shown(link, quoted=True)}"
    if stat.S_ISREG(mode):
        return f"regular file {shown(link, quoted=True)}"
    # anon_inode:[eventpoll], anon_inode:[eventfd], ...: the link says it all.
    return shown(link, quoted=True)
