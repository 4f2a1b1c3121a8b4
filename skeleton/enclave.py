"""An enclave in this process: its fd, its layout, and the memory mapped from it.

Mapping goes through libc's mmap (cffi, ``skeleton.native``) rather than
Python's mmap module, because an enclave must sit at fixed addresses: its base is part of
what was measured. MAP_FIXED_NOREPLACE makes the kernel refuse, instead of
replace, an address this process already uses (DESIGN §3 and §5).
"""

import errno
import os

from skeleton.errors import BackendError, MappingConflict, SkeletonError
from skeleton.native import ffi, libc as _libc
from skeleton.structs import (ENTRY_RECORD, ENTRY_RECORD_MAGIC, ENTRY_RECORD_OFFSET,
                              PAGE_SIZE, TCS)

PROT_NONE = 0
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17
_MAP_FAILED = ffi.cast("void *", -1)
# ECALL 0 writes the NUL-terminated greeting; this is ample room for it.
GREETING_BUFFER = 256
ECALL_INIT = 0
ECALL_REPORT = 1
# ECALL 1's buffer (struct report_call in encl.c): TARGETINFO and report data
# in, the REPORT written after them.
REPORT_CALL_TARGETINFO = 0
REPORT_CALL_REPORT_DATA = 512
REPORT_CALL_REPORT = 576
REPORT_CALL_SIZE = 576 + 432


def _mmap(addr, size, prot, flags, fd=-1, offset=0):
    """mmap(2); returns the address, or raises OSError with the errno."""
    ptr = _libc.mmap(ffi.cast("void *", addr), size, prot, flags, fd, offset)
    if ptr == _MAP_FAILED:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return int(ffi.cast("uintptr_t", ptr))


def release(addr, size):
    """munmap(2) a range this process mapped."""
    if _libc.munmap(ffi.cast("void *", addr), size):
        err = ffi.errno
        raise OSError(err, f"munmap {addr:#x}: {os.strerror(err)}")


# Where enclave bases are picked: far below the kernel's top-down mmap area
# (just under 0x7fxxxxxxxxxx) and the brk heap of a PIE program (from about
# 0x55xxxxxxxxxx), so that a pooled enclave's range is very likely free in
# whatever process checks it out later, and stays free in the builder after
# it unmaps (the kernel would otherwise hand a freed range near the top of
# the mmap area to the next thread stack).
ENCLAVE_ZONE = (1 << 44, 80 << 40)
_PLACEMENT_TRIES = 16


def reserve_aligned(size):
    """Reserve ``size`` bytes of address space aligned to ``size``; returns the base.

    SECS.BASEADDR must be naturally aligned to SECS.SIZE (SDM Vol. 3D, 34.7).
    A random aligned base inside ENCLAVE_ZONE is tried first; if none is free,
    the kernel picks: reserve twice the size, keep the aligned middle and give
    back the rest.
    """
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
    low, high = ENCLAVE_ZONE
    for _ in range(_PLACEMENT_TRIES):
        # os.urandom rather than random: the PAL imports this module in
        # every container, and random's import costs more than its use.
        slots = high // size - low // size
        base = (low // size + int.from_bytes(os.urandom(8), "little") % slots) * size
        try:
            got = _mmap(base, size, PROT_NONE, flags | MAP_FIXED_NOREPLACE)
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
            continue
        if got == base:
            return base
        release(got, size)  # a kernel before 4.17 took the address as a hint
    start = _mmap(0, 2 * size, PROT_NONE, flags)
    base = -(-start // size) * size
    if base > start:
        release(start, base - start)
    if start + 2 * size > base + size:
        release(base + size, start + size - base)
    return base


class Enclave:
    """An initialized enclave: an fd plus the layout it must be mapped at.

    ``oentry`` is the entry point EENTER runs (the stub in entry.S) and
    ``body`` the C body the stub calls, both as offsets from ``base``. In sim
    they are read from the mapped TCS page and the entry record after it, and
    the body is what runs: sim cannot execute the stub's ENCLU. Both are None
    while unmapped (``body`` also when the image has no entry record).
    """

    def __init__(self, fd, layout, identity, *, base=None, reservation=None,
                 sigstruct=None):
        self.fd = fd
        self.layout = list(layout)
        self.identity = identity
        # The SIGSTRUCT record the enclave was initialized with: its ISV fields
        # go into reports, and the sgx backend enters at its image's OENTRY.
        self.sigstruct = sigstruct
        self.backend = identity.backend
        self.base = _base_of(self.layout, identity.size) if base is None else base
        self.oentry = None
        self.body = None
        self._mapped = []
        # Address space this process reserved for the enclave, which map() may
        # replace and unmap() gives back.
        self._reservation = reservation
        self._closed = False

    @classmethod
    def adopt(cls, fd, layout, identity, sigstruct=None, oentry=None):
        """Wrap an enclave fd received from elsewhere (e.g. the pool), not mapped.

        ``sigstruct`` (the image's SIGSTRUCT record) is needed for reports;
        ``oentry`` (the image's TCS OENTRY as added) is needed to enter an
        sgx enclave, whose TCS page cannot be read.
        """
        if identity.backend == "sgx":
            from skeleton.backends.sgx import SgxEnclave
            return SgxEnclave(fd, layout, identity, sigstruct=sigstruct,
                              oentry=oentry)
        return cls(fd, layout, identity, sigstruct=sigstruct)

    @property
    def mapped(self):
        return bool(self._mapped)

    def map(self):
        """Map every layout entry at its address.

        Raises MappingConflict when an address is already mapped in this
        process, after undoing what was mapped; existing mappings are untouched.
        """
        if self._closed:
            raise SkeletonError("the enclave is closed")
        if self._mapped:
            raise SkeletonError(f"the enclave at {self.base:#x} is already mapped")
        try:
            for entry in self.layout:
                self._map_entry(entry)
        except BaseException:
            self._release_entries()
            raise
        # The sim TCS page is ordinary memory. On hardware a TCS cannot be read,
        # so the sgx backend takes OENTRY from the image instead.
        start = self.layout[0].addr
        tcs = ffi.buffer(ffi.cast("char *", start), PAGE_SIZE)
        self.oentry = TCS.get(tcs, "oentry")
        record = ENTRY_RECORD.unpack(ffi.buffer(
            ffi.cast("char *", start + ENTRY_RECORD_OFFSET), ENTRY_RECORD.size)[:])
        if record.magic == ENTRY_RECORD_MAGIC:
            self.body = start - self.base + record.body

    def _map_entry(self, entry):
        reserved_addr, reserved_size = self._reservation or (0, 0)
        inside = (reserved_addr <= entry.addr
                  and entry.addr + entry.size <= reserved_addr + reserved_size)
        flags = entry.flags | (MAP_FIXED if inside else MAP_FIXED_NOREPLACE)
        try:
            addr = _mmap(entry.addr, entry.size, entry.prot, flags, self.fd,
                         entry.addr - self.base)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise MappingConflict(f"enclave range {entry.addr:#x}+{entry.size:#x}"
                                      " is already mapped in this process") from None
            raise BackendError(f"cannot map enclave range {entry.addr:#x}+"
                               f"{entry.size:#x}: {e.strerror}") from None
        if addr != entry.addr:
            # A kernel older than 4.17 takes the address as a hint only.
            release(addr, entry.size)
            raise MappingConflict(f"enclave range {entry.addr:#x}+{entry.size:#x} "
                                  f"is in use (the kernel offered {addr:#x})")
        self._mapped.append((entry.addr, entry.size))

    def _release_entries(self):
        while self._mapped:
            release(*self._mapped.pop())

    def body_address(self):
        """The address of the enclave's C body, ``void body(uint64_t op, void *buf)``.

        This is how sim runs enclave code: a plain call, where hardware would
        EENTER at OENTRY. Raises BackendError on a backend whose code cannot be
        called directly, SkeletonError when the enclave is unmapped or its
        image has no entry record or a body outside its executable memory.
        """
        if self.backend != "sim":
            raise BackendError(f"an enclave on the {self.backend} backend is "
                               "entered with EENTER, not called")
        if not self._mapped:
            raise SkeletonError("ECALL on an enclave that is not mapped")
        if self.body is None:
            raise SkeletonError("the enclave's image has no entry record (built "
                                "before the entry stub): rebuild it with `make "
                                "image`")
        address = self.base + self.body
        if not any(e.execute and e.addr <= address < e.addr + e.size
                   for e in self.layout):
            raise SkeletonError(f"enclave body {address:#x} is not in executable "
                                "memory")
        return address

    def ecall(self, op):
        """Run an ECALL in the enclave; ECALL 0 returns the greeting.

        In sim only ECALL 0 runs enclave code; ECALL 1 needs EREPORT, which
        only hardware has, so sim's reports come from ``report()`` in Python.
        Raises SkeletonError for an unmapped enclave or an unknown ECALL.
        """
        if op != ECALL_INIT:
            raise SkeletonError(f"ECALL {op} cannot be called here: ECALL 0 is "
                                "the greeting, reports come from report()")
        buf = ffi.new("char[]", GREETING_BUFFER)
        ffi.cast("void (*)(uint64_t, void *)", self.body_address())(op, buf)
        return ffi.string(buf, GREETING_BUFFER).decode()

    def report(self, targetinfo, report_data):
        """EREPORT: the 432-byte REPORT of this enclave for a target enclave.

        ``targetinfo`` is a 512-byte TARGETINFO, ``report_data`` 64 bytes. Sim
        has no EREPORT, so it does not run the enclave's ECALL 1: Python plays
        the CPU (``skeleton.report``), with the secret from
        $EPM_SIM_SECRET_DIR. Raises ReportError for bad sizes, an unknown
        SIGSTRUCT or an unreadable secret.
        """
        from skeleton import report
        report.check_sizes(targetinfo, report_data)
        if self.sigstruct is None:
            raise report.ReportError("the enclave's SIGSTRUCT is unknown (adopt it "
                                     "with sigstruct=): its ISV fields are needed")
        if self._closed:
            raise SkeletonError("the enclave is closed")
        return report.ereport(
            report.load_secret(), bytes(targetinfo), bytes(report_data),
            mrenclave=self.identity.mrenclave, mrsigner=self.identity.mrsigner,
            attributes=self.identity.attributes, xfrm=self.identity.xfrm,
            isvprodid=self.sigstruct.isvprodid, isvsvn=self.sigstruct.isvsvn,
            miscselect=self.sigstruct.miscselect)

    def unmap(self):
        """Unmap the enclave's memory and any address space reserved for it."""
        self._release_entries()
        if self._reservation:
            release(*self._reservation)
            self._reservation = None
        self.oentry = self.body = None

    def close(self):
        """Unmap if mapped and close the fd; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            self.unmap()
        finally:
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _base_of(layout, size):
    """The enclave base: every layout entry lies in [base, base + size), and the
    base is aligned to the power-of-two size (SDM Vol. 3D, 34.7)."""
    if not layout:
        raise SkeletonError("an enclave layout needs at least its TCS entry")
    if size < PAGE_SIZE or size & (size - 1):
        raise SkeletonError(f"enclave size {size:#x} is not a power of two")
    base = layout[0].addr & ~(size - 1)
    for entry in layout:
        if not (base <= entry.addr and entry.addr + entry.size <= base + size):
            raise SkeletonError(f"layout entry {entry.addr:#x}+{entry.size:#x} is "
                                f"outside the enclave [{base:#x}, +{size:#x})")
    return base
