"""What the host CPU has enabled: XCR0, the XSAVE features an enclave may use.

ECREATE refuses a SECS whose XFRM is not a subset of XCR0 (SDM Vol. 3D, 38.4
ECREATE), so the sim backend needs the host's XCR0. CPUID leaf 0xD reports
what the processor supports, not what the kernel enabled in XCR0, and the
two differ when the kernel leaves a feature off (AMX or AVX-512 disabled by
a boot option); only XGETBV reads XCR0 itself. The instruction runs from 13
bytes of machine code on a page of our own, called through cffi: no compiler
is needed when the runtime is loaded, which matters inside a container.
"""

import functools
import mmap

from skeleton.errors import BackendError
from skeleton.native import ffi

# xor ecx, ecx; xgetbv; shl rdx, 32; or rax, rdx; ret
_XGETBV_0 = bytes.fromhex("31c90f01d048c1e2204809d0c3")
XCR0_LEGACY = 0x3  # x87 | SSE, what a CPU without OSXSAVE runs with


def _osxsave():
    """Whether the kernel turned on XSAVE (CR4.OSXSAVE); XGETBV faults otherwise."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "xsave" in line.split()
    except OSError:
        pass
    return False


@functools.cache
def xcr0():
    """This host's XCR0 (a bit per enabled XSAVE state component).

    Raises BackendError when the code page cannot be made executable (a
    policy such as SELinux execmem forbidding it).
    """
    if not _osxsave():
        return XCR0_LEGACY
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError as e:
        raise BackendError(f"cannot map a code page to run XGETBV: {e}") from None
    with page:
        page.write(_XGETBV_0)
        code = ffi.from_buffer(page)
        try:
            return int(ffi.cast("uint64_t (*)(void)", code)())
        finally:
            ffi.release(code)
