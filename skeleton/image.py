"""Reading a signed skeleton image: ``encl.bin`` and its SIGSTRUCT ``encl.ss``."""

import collections
import errno
import hashlib
import os
import stat

from epm_client.types import Identity
from skeleton.errors import ImageError
from skeleton.measure import Geometry, round_up
from skeleton.structs import (ENTRY_RECORD, ENTRY_RECORD_MAGIC, ENTRY_RECORD_OFFSET,
                              METADATA, PAGE_SIZE, SIGSTRUCT, SIGSTRUCT_HEADER,
                              SIGSTRUCT_HEADER2, TCS)

MMAP_MIN_ADDR_PATH = "/proc/sys/vm/mmap_min_addr"
IMAGE_NAME = "encl.bin"
SIGSTRUCT_NAME = "encl.ss"
# The TCS page and the page holding the metadata record.
MIN_IMAGE_PAGES = 2
# encl.bin holds the enclave's code and initial data, which the signer and the
# loader read whole; heap and stack pages come from the mmap size (-s), not
# from the file. The skeleton's image is 20 KiB; 64 MiB leaves room for a
# much larger program while keeping a mistaken path (a disk image, /dev/zero)
# from being read into memory.
MAX_IMAGE_SIZE = 64 << 20
# The largest enclave (SECS.SIZE) an image may ask for: 2^36, the
# MaxEnclaveSize_64 that CPUID leaf 0x12 reports on client SGX parts. The
# metadata's u64 would allow far more, but every page is measured at build
# and signing time (about 1.5 GiB/s here), so 64 GiB already takes about 40 s.
MAX_ENCLAVE_SIZE = 64 << 30


# data: the page-rounded encl.bin, metadata record included; metadata and
# sigstruct: structs.METADATA and structs.SIGSTRUCT records. A named tuple, not
# a dataclass, because the PAL imports it in every container it starts.
class EnclaveImage(collections.namedtuple(
        "EnclaveImage", "data metadata sigstruct sigstruct_bytes geometry")):
    """An image as signed: its pages, metadata, SIGSTRUCT and enclave geometry."""

    __slots__ = ()

    @property
    def encl_offset(self):
        return self.geometry.encl_offset

    @property
    def mmap_size(self):
        return self.geometry.mmap_size

    @property
    def enclave_size(self):
        return self.geometry.enclave_size

    @property
    def ssa_frame_pages(self):
        return self.geometry.ssa_frame_pages

    @property
    def body(self):
        """The C body's offset from the image start, from the entry record.

        Hardware enters at the TCS's OENTRY (the entry stub); the sim backend
        calls this instead, because it cannot run the stub's ENCLU.
        """
        return entry_record(self.data).body

    @property
    def mrsigner(self):
        """SHA-256 of the signer's modulus as stored: 384 bytes, little-endian."""
        return hashlib.sha256(self.sigstruct.modulus).digest()

    def identity(self, backend):
        """The pool identity of any enclave built from this image on a backend."""
        return Identity(mrenclave=self.sigstruct.enclave_hash, mrsigner=self.mrsigner,
                        attributes=self.sigstruct.attributes,
                        xfrm=self.sigstruct.xfrm, size=self.enclave_size,
                        backend=backend)


def read_pages(path):
    """The bytes of an image file rounded up to whole pages; raises ImageError."""
    path = os.fspath(path)
    data = read_file(path, MAX_IMAGE_SIZE)
    if len(data) <= (MIN_IMAGE_PAGES - 1) * PAGE_SIZE:
        raise ImageError(f"{path}: {len(data)} bytes is too small for a TCS page "
                         "and a metadata page")
    return data + bytes(round_up(len(data)) - len(data))


def load_image(directory):
    """Read ``encl.bin`` and ``encl.ss`` from a directory.

    Returns an EnclaveImage; raises ImageError naming the file that is missing
    or malformed.
    """
    image_path = os.path.join(directory, IMAGE_NAME)
    sigstruct_path = os.path.join(directory, SIGSTRUCT_NAME)
    data = read_pages(image_path)
    raw = read_file(sigstruct_path, SIGSTRUCT.size)
    if len(raw) != SIGSTRUCT.size:
        raise ImageError(f"{sigstruct_path}: expected a {SIGSTRUCT.size}-byte "
                         f"SIGSTRUCT, got {len(raw)} bytes")
    sigstruct = SIGSTRUCT.unpack(raw)
    # Bit 31 of the header's last u32 is the published signer's debug marker.
    if (sigstruct.header[:12] != SIGSTRUCT_HEADER[:12]
            or sigstruct.header2 != SIGSTRUCT_HEADER2):
        raise ImageError(f"{sigstruct_path}: not a SIGSTRUCT (bad header)")

    metadata = METADATA.unpack(data[-PAGE_SIZE:][:METADATA.size])
    try:
        geometry = Geometry.compute(len(data), metadata, sigstruct.xfrm,
                                    sigstruct.miscselect)
    except ImageError as e:
        raise ImageError(f"{image_path}: {e}") from None
    check_enclave_size(geometry.enclave_size, image_path)
    oentry = TCS.get(data, "oentry")
    if not PAGE_SIZE <= oentry < len(data):
        raise ImageError(f"{image_path}: TCS OENTRY {oentry:#x} is outside the image")
    try:
        entry_record(data)
    except ImageError as e:
        raise ImageError(f"{image_path}: {e}") from None
    return EnclaveImage(data=data, metadata=metadata, sigstruct=sigstruct,
                        sigstruct_bytes=raw, geometry=geometry)


def entry_record(data):
    """The entry record of the image ``data``.

    Returns the structs.ENTRY_RECORD record; raises ImageError when it is
    missing or names a body outside the code pages.
    """
    at = ENTRY_RECORD_OFFSET
    record = ENTRY_RECORD.unpack(bytes(data[at:at + ENTRY_RECORD.size]))
    if record.magic != ENTRY_RECORD_MAGIC:
        raise ImageError("no entry record after the TCS page: an image from "
                         "before the entry stub? rebuild it with `make image`")
    if not PAGE_SIZE <= record.body < len(data):
        raise ImageError(f"the entry record's body {record.body:#x} is outside "
                         "the image")
    return record


def host_mmap_min_addr(path=MMAP_MIN_ADDR_PATH):
    """This host's ``vm.mmap_min_addr``; raises ImageError when unreadable."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError) as e:
        raise ImageError(f"cannot read vm.mmap_min_addr from {path}: {e}") from None


NO_PROTECTION_WARNING = (
    "NULL-dereference protection is off: the enclave does not own address 0, "
    "so a NULL pointer in enclave code reaches whatever the host maps there "
    "(sign with -n to protect it)")


def check_host(image, mmap_min_addr=None):
    """Check that this host can run an image as signed; returns warnings.

    With NULL-dereference protection the enclave starts at address 0 and the
    image at the signed ``mmap_min_addr``; a host whose ``vm.mmap_min_addr``
    differs would either refuse the mapping or leave pages below the image
    that an attacker could map, so the start is refused. ``mmap_min_addr``
    defaults to this host's value. Returns a list of warning strings (the
    warning when protection is off); raises ImageError on a mismatch.
    """
    metadata = image.metadata
    if not metadata.null_dereference_protection:
        return [NO_PROTECTION_WARNING]
    host = host_mmap_min_addr() if mmap_min_addr is None else mmap_min_addr
    if host != metadata.mmap_min_addr:
        raise ImageError(f"the image was signed for vm.mmap_min_addr "
                         f"{metadata.mmap_min_addr:#x} with NULL-dereference "
                         f"protection, but this host has {host:#x}: set "
                         f"vm.mmap_min_addr={metadata.mmap_min_addr} or re-sign "
                         "the image with -m")
    return []


def check_enclave_size(size, source):
    """Raise ImageError(EFBIG) naming ``source`` when an enclave size exceeds
    MAX_ENCLAVE_SIZE."""
    if size > MAX_ENCLAVE_SIZE:
        raise ImageError(f"{source}: enclave size {size:#x} is too large (at most "
                         f"{MAX_ENCLAVE_SIZE:#x}, 64 GiB)", errno.EFBIG)


def read_file(path, limit):
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Symbolic links are followed. Anything but a regular file (a directory, a
    FIFO, a device such as /dev/zero) is refused before it is read, and
    opened, if at all, without blocking. Raises ImageError whose ``errno``
    is ENOENT for a missing file, EISDIR for a directory, EFBIG for a file
    over ``limit`` bytes and EINVAL otherwise.
    """
    path = os.fspath(path)
    try:
        # Checked before opening, so that no device is ever opened, and
        # again on the opened file, which is the one read.
        _check_regular(path, os.stat(path), limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file", errno.ENOENT) from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}", e.errno) from None
    try:
        _check_regular(path, os.fstat(fd), limit)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}", e.errno) from None
    finally:
        os.close(fd)
    if size > limit:
        raise ImageError(f"{path}: too large (more than {limit} bytes, at most "
                         f"{limit})", errno.EFBIG)
    return b"".join(chunks)


def _check_regular(path, st, limit):
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a directory, not a regular file", errno.EISDIR)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file", errno.EINVAL)
    if st.st_size > limit:
        raise ImageError(f"{path}: too large ({st.st_size} bytes, at most {limit})",
                         errno.EFBIG)
