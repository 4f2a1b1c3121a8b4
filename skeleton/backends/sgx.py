"""The sgx backend: enclaves built by the Linux in-tree driver, through cffi.

The request sequence follows the kernel's uapi header ``asm/sgx.h`` and its
selftest loader: reserve the enclave's naturally aligned range, ECREATE with
the SECS, ADD_PAGES with SGX_PAGE_MEASURE for every page in the order that
decides MRENCLAVE (DESIGN §5), INIT with the SIGSTRUCT, then map the TCS page
and the code/data range MAP_SHARED at their fixed addresses. The enclave is
entered through the vDSO's ``__vdso_sgx_enter_enclave``.

None of this has run on SGX hardware: no machine here has the device. The
tests check the ioctl numbers and structure layouts against the kernel header
compiled with gcc, and the exact requests against a recording stand-in.
"""

import errno
import os
import struct

from epm_client.types import LayoutEntry
from skeleton.enclave import (ECALL_INIT, ECALL_REPORT, GREETING_BUFFER,
                              REPORT_CALL_REPORT, REPORT_CALL_REPORT_DATA,
                              REPORT_CALL_SIZE, Enclave, release)
from skeleton.errors import BackendError, EinitError, SkeletonError
from skeleton.measure import tcs_as_added
# The driver's structures are declared in skeleton.ffi_build, after asm/sgx.h.
from skeleton.native import ffi, libc as _libc
from skeleton.structs import PAGE_SIZE, PT_TCS, REG_RWX, SECS, SECINFO, TCS

BACKEND = "sgx"
DEVICE = "/dev/sgx_enclave"
# Other drivers' devices: found only to say that they are not supported.
OUT_OF_TREE_DEVICES = {
    "/dev/sgx/enclave": "the out-of-tree DCAP driver",
    "/dev/isgx": "the legacy out-of-tree isgx driver",
}



def _ioc(direction, number, size, magic=0xA4):
    """_IOC from the kernel's asm-generic/ioctl.h."""
    return direction << 30 | size << 16 | magic << 8 | number


_IOC_WRITE, _IOC_READ = 1, 2
SGX_IOC_ENCLAVE_CREATE = _ioc(_IOC_WRITE, 0x00,
                              ffi.sizeof("struct sgx_enclave_create"))
SGX_IOC_ENCLAVE_ADD_PAGES = _ioc(_IOC_WRITE | _IOC_READ, 0x01,
                                 ffi.sizeof("struct sgx_enclave_add_pages"))
SGX_IOC_ENCLAVE_INIT = _ioc(_IOC_WRITE, 0x02, ffi.sizeof("struct sgx_enclave_init"))
SGX_PAGE_MEASURE = 0x1
assert (SGX_IOC_ENCLAVE_CREATE, SGX_IOC_ENCLAVE_ADD_PAGES, SGX_IOC_ENCLAVE_INIT) \
    == (0x4008A400, 0xC030A401, 0x4008A402)  # DESIGN §5

PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4
MAP_SHARED, MAP_FIXED = 0x01, 0x10
_MAP_FAILED = 2 ** 64 - 1
AT_SYSINFO_EHDR = 33
ENCLU_EENTER, ENCLU_EEXIT = 2, 4
# EINIT's error codes (SDM Vol. 3D, 40.1.4), as the driver returns them.
EINIT_ERRORS = {
    1: "the SIGSTRUCT is malformed (SGX_INVALID_SIG_STRUCT)",
    2: "the attributes, XFRM or MISCSELECT are outside the SIGSTRUCT's masks "
       "(SGX_INVALID_ATTRIBUTE)",
    4: "MRENCLAVE mismatch (SGX_INVALID_MEASUREMENT)",
    8: "the SIGSTRUCT signature does not verify (SGX_INVALID_SIGNATURE)",
    16: "the launch token is invalid: this host's launch control refuses the "
        "signer (SGX_INVALID_EINITTOKEN)",
    32: "the CPUSVN is invalid (SGX_INVALID_CPUSVN)",
    128: "EINIT was interrupted (SGX_UNMASKED_EVENT)",
}
_ZERO_CHUNK = 1 << 20  # zero pages go in 1 MiB requests from one buffer


def detect(exists=os.path.exists):
    """The in-tree driver's device path; raises BackendError naming what was found."""
    if exists(DEVICE):
        return DEVICE
    for path, driver in OUT_OF_TREE_DEVICES.items():
        if exists(path):
            raise BackendError(f"{path} belongs to {driver}, which is not "
                               f"supported: the sgx backend needs the in-tree "
                               f"driver's {DEVICE} (Linux 5.11 or later)")
    raise BackendError(f"the sgx backend needs {DEVICE}, not found on this host; "
                       "ask for the sim backend to simulate")


class Driver:
    """The system calls the backend makes; tests replace it with a recorder."""

    def open(self, path):
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(f"cannot open {path}: {e.strerror}") from None

    def ioctl(self, fd, request, arg):
        """ioctl(2); returns its non-negative result or raises OSError."""
        result = _libc.ioctl(fd, request, arg)
        if result < 0:
            err = ffi.errno
            raise OSError(err, os.strerror(err))
        return result

    def mmap(self, addr, size, prot, flags, fd, offset=0):
        ptr = _libc.mmap(ffi.cast("void *", addr), size, prot, flags, fd, offset)
        if int(ffi.cast("uintptr_t", ptr)) == _MAP_FAILED:
            err = ffi.errno
            raise OSError(err, os.strerror(err))
        return int(ffi.cast("uintptr_t", ptr))

    def munmap(self, addr, size):
        release(addr, size)

    def close(self, fd):
        os.close(fd)


def _aligned(size, alignment):
    """A zeroed buffer of ``size`` bytes at an ``alignment``; (owner, address)."""
    owner = ffi.new("char[]", size + alignment)
    addr = int(ffi.cast("uintptr_t", owner))
    return owner, -(-addr // alignment) * alignment


def _reserve(driver, fd, size):
    """Map twice the enclave size from the device, keep the aligned half.

    SECS.BASEADDR must be aligned to SECS.SIZE; mapping the device fd itself
    (as the kernel selftest does) makes the range the enclave's.
    """
    start = driver.mmap(0, 2 * size, PROT_NONE, MAP_SHARED, fd)
    base = -(-start // size) * size
    if base > start:
        driver.munmap(start, base - start)
    if start + 2 * size > base + size:
        driver.munmap(base + size, start + size - base)
    return base


def _add_pages(driver, fd, base, src, offset, length, flags, keep):
    """SGX_IOC_ENCLAVE_ADD_PAGES for a run of pages of one kind, measured.

    The driver may add fewer pages than asked (a pending signal); the rest is
    asked for again from where it stopped.
    """
    owner, secinfo = _aligned(SECINFO.size, 64)  # SECINFO is 64-byte aligned
    ffi.memmove(ffi.cast("char *", secinfo), SECINFO.pack(flags=flags), SECINFO.size)
    keep.append(owner)
    done = 0
    while done < length:
        arg = ffi.new("struct sgx_enclave_add_pages *", {
            "src": src + done, "offset": offset + done, "length": length - done,
            "secinfo": secinfo, "flags": SGX_PAGE_MEASURE})
        try:
            driver.ioctl(fd, SGX_IOC_ENCLAVE_ADD_PAGES, arg)
        except OSError as e:
            if e.errno not in (errno.EINTR, errno.EAGAIN) or not arg.count:
                raise BackendError(f"SGX_IOC_ENCLAVE_ADD_PAGES at {offset + done:#x}"
                                   f" failed: {e.strerror}") from None
        done += arg.count


def build(image, *, debug=False, driver=None, device=None):
    """Build, initialize and map an enclave on the in-tree driver; returns it.

    Raises BackendError when the device is missing or a request fails and
    EinitError when EINIT refuses the enclave.
    """
    driver = driver or Driver()
    path = device or detect()
    geometry = image.geometry
    attributes = image.sigstruct.attributes | (0x2 if debug else 0)
    fd = driver.open(path)
    keep = []  # buffers the kernel reads from, alive until the end
    reservation = None
    try:
        if geometry.encl_offset:
            base = 0  # NULL-dereference protection: the enclave starts at 0
        else:
            base = _reserve(driver, fd, geometry.enclave_size)
            reservation = (base, geometry.enclave_size)

        secs_owner, secs = _aligned(PAGE_SIZE, PAGE_SIZE)
        keep.append(secs_owner)
        ffi.memmove(ffi.cast("char *", secs), SECS.pack(
            size=geometry.enclave_size, baseaddr=base,
            ssaframesize=geometry.ssa_frame_pages,
            miscselect=image.sigstruct.miscselect, attributes=attributes,
            xfrm=image.sigstruct.xfrm), PAGE_SIZE)
        create = ffi.new("struct sgx_enclave_create *", {"src": secs})
        try:
            driver.ioctl(fd, SGX_IOC_ENCLAVE_CREATE, create)
        except OSError as e:
            raise BackendError(f"SGX_IOC_ENCLAVE_CREATE failed: {e.strerror}") \
                from None

        _add_runs(driver, fd, base, image, keep)
        _einit(driver, fd, image.sigstruct_bytes)

        start = base + geometry.encl_offset
        layout = [
            LayoutEntry(start, PAGE_SIZE, read=True, write=True, share=True),
            LayoutEntry(start + PAGE_SIZE, geometry.mmap_size - PAGE_SIZE,
                        read=True, write=True, execute=True, share=True),
        ]
        oentry = TCS.get(tcs_as_added(image.data, geometry), "oentry")
        enclave = SgxEnclave(fd, layout, image.identity(BACKEND), base=base,
                             reservation=reservation, sigstruct=image.sigstruct,
                             oentry=oentry, driver=driver)
    except BaseException:
        if reservation:
            driver.munmap(*reservation)
        driver.close(fd)
        raise
    try:
        enclave.map()
    except BaseException:
        enclave.close()
        raise
    return enclave


def _add_runs(driver, fd, base, image, keep):
    """Add every page as DESIGN §5 orders them, in runs of one kind."""
    geometry = image.geometry
    offset = geometry.encl_offset
    tcs_owner, tcs = _aligned(PAGE_SIZE, PAGE_SIZE)
    ffi.memmove(ffi.cast("char *", tcs), tcs_as_added(image.data, geometry),
                PAGE_SIZE)
    keep.append(tcs_owner)
    _add_pages(driver, fd, base, tcs, offset, PAGE_SIZE, PT_TCS, keep)

    body_size = len(image.data) - PAGE_SIZE
    body_owner, body = _aligned(body_size, PAGE_SIZE)
    ffi.memmove(ffi.cast("char *", body), image.data[PAGE_SIZE:], body_size)
    keep.append(body_owner)
    _add_pages(driver, fd, base, body, offset + PAGE_SIZE, body_size, REG_RWX, keep)

    zeros_owner, zeros = _aligned(_ZERO_CHUNK, PAGE_SIZE)
    keep.append(zeros_owner)
    for at in range(len(image.data), geometry.mmap_size, _ZERO_CHUNK):
        length = min(_ZERO_CHUNK, geometry.mmap_size - at)
        _add_pages(driver, fd, base, zeros, offset + at, length, REG_RWX, keep)


def _einit(driver, fd, sigstruct_bytes):
    sigstruct = ffi.new("char[]", sigstruct_bytes)
    arg = ffi.new("struct sgx_enclave_init *",
                  {"sigstruct": int(ffi.cast("uintptr_t", sigstruct))})
    try:
        code = driver.ioctl(fd, SGX_IOC_ENCLAVE_INIT, arg)
    except OSError as e:
        raise EinitError(f"SGX_IOC_ENCLAVE_INIT failed: {e.strerror}") from None
    if code:
        reason = EINIT_ERRORS.get(code, f"SGX error code {code}")
        raise EinitError(f"EINIT refused the enclave: {reason}")


class SgxEnclave(Enclave):
    """An enclave on the in-tree driver: entered with EENTER, never read directly.

    A TCS cannot be read from outside the enclave, so OENTRY comes from the
    image (``oentry``), not from the mapped TCS page as in sim.
    """

    def __init__(self, fd, layout, identity, *, base=None, reservation=None,
                 sigstruct=None, oentry=None, driver=None):
        super().__init__(fd, layout, identity, base=base, reservation=reservation,
                         sigstruct=sigstruct)
        self._image_oentry = oentry
        self._driver = driver or Driver()

    def map(self):
        """Map every layout entry MAP_SHARED at its address (the driver refuses
        MAP_PRIVATE); raises MappingConflict like the sim enclave."""
        if self._closed:
            raise SkeletonError("the enclave is closed")
        try:
            for entry in self.layout:
                self._map_entry(entry)
        except BaseException:
            self._release_entries()
            raise
        self.oentry = self._image_oentry

    def _enter(self, op, buf):
        """EENTER the enclave's TCS through the vDSO, for the entry stub.

        ``__vdso_sgx_enter_enclave(rdi, rsi, rdx, leaf, r8, r9, run)`` passes
        RDI, RSI, RDX, R8 and R9 to the enclave as they are; the stub at
        OENTRY (skeleton/enclave/entry.S) takes RDI = the ECALL number and
        RSI = the buffer, runs the body on its own stack, and leaves with
        EEXIT, which the vDSO records as ``run.function``. Raises BackendError
        when the enclave left any other way (an exception: no handler is
        installed, so the vDSO returns with its vector).
        """
        if not self._mapped:
            raise SkeletonError("ECALL on an enclave that is not mapped")
        run = ffi.new("struct sgx_enclave_run *", {"tcs": self.layout[0].addr})
        result = vdso_enter_enclave()(op, int(ffi.cast("uintptr_t", buf)), 0,
                                      ENCLU_EENTER, 0, 0, run)
        if result or run.function != ENCLU_EEXIT:
            raise BackendError(
                f"ECALL {op} did not return by EEXIT (result {result}, exception "
                f"vector {run.exception_vector} at {run.exception_addr:#x})")

    def ecall(self, op):
        """ECALL 0: the greeting, from inside the enclave."""
        if op != ECALL_INIT:
            raise SkeletonError(f"ECALL {op} cannot be called here: ECALL 0 is "
                                "the greeting, reports come from report()")
        buf = ffi.new("char[]", GREETING_BUFFER)
        self._enter(op, buf)
        return ffi.string(buf, GREETING_BUFFER).decode()

    def report(self, targetinfo, report_data):
        """ECALL 1: EREPORT inside the enclave for a TARGETINFO and report data.

        Returns the 432-byte REPORT, MACed by the CPU for the target; raises
        ReportError for bad sizes and BackendError when the ECALL fails.
        """
        from skeleton import report
        report.check_sizes(targetinfo, report_data)
        # struct report_call in encl.c: the enclave copies TARGETINFO and the
        # report data in, runs EREPORT on its own aligned copies, and writes
        # the REPORT after them.
        buf = ffi.new("char[]", REPORT_CALL_SIZE)
        ffi.memmove(buf, bytes(targetinfo) + bytes(report_data),
                    REPORT_CALL_REPORT_DATA + len(report_data))
        self._enter(ECALL_REPORT, buf)
        return bytes(ffi.buffer(buf + REPORT_CALL_REPORT,
                                REPORT_CALL_SIZE - REPORT_CALL_REPORT))


_vdso_function = None


def vdso_enter_enclave():
    """``__vdso_sgx_enter_enclave`` from this process's vDSO, as a cffi function.

    Raises BackendError when the kernel's vDSO does not export it (a kernel
    without the in-tree driver).
    """
    global _vdso_function
    if _vdso_function is None:
        addr = vdso_symbol("__vdso_sgx_enter_enclave")
        if addr is None:
            raise BackendError("the vDSO has no __vdso_sgx_enter_enclave: this "
                               "kernel cannot enter enclaves")
        _vdso_function = ffi.cast(
            "int (*)(unsigned long, unsigned long, unsigned long, unsigned int, "
            "unsigned long, unsigned long, struct sgx_enclave_run *)", addr)
    return _vdso_function


def vdso_symbol(name):
    """The address of a dynamic symbol of the vDSO, or None (ELF64 gABI)."""
    ehdr = _libc.getauxval(AT_SYSINFO_EHDR)
    if not ehdr:
        return None

    def read(addr, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, bytes(ffi.buffer(ffi.cast("char *", addr), size)))

    shoff, = read(ehdr + 0x28, "<Q")
    shentsize, shnum = read(ehdr + 0x3A, "<HH")
    phoff, = read(ehdr + 0x20, "<Q")
    phentsize, phnum = read(ehdr + 0x36, "<HH")
    bias = ehdr
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr = read(ehdr + phoff + i * phentsize, "<IIQQ")
        if p_type == 1:  # PT_LOAD: the load bias is its address minus its vaddr
            bias = ehdr + p_offset - p_vaddr
            break
    sections = [read(ehdr + shoff + i * shentsize, "<IIQQQQIIQQ")
                for i in range(shnum)]
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        strtab = ehdr + sections[link][4]
        for at in range(ehdr + offset, ehdr + offset + size, entsize):
            st_name, _, _, _, st_value, _ = read(at, "<IBBHQQ")
            if ffi.string(ffi.cast("char *", strtab + st_name)) == name.encode():
                return bias + st_value if st_value else None
    return None
