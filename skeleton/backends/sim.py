"""The sim backend: an enclave whose memory is a sealed memfd (DESIGN §5).

ECREATE, EADD and EEXTEND measure exactly as hardware does; EINIT checks the
SIGSTRUCT as hardware would. What is not simulated: the memory is not
encrypted nor isolated from the host, which is why sim is only ever chosen
explicitly.
"""

import fcntl
import os

from epm_client.types import LayoutEntry
from skeleton.enclave import Enclave, release, reserve_aligned
from skeleton import cpu, openssl
from skeleton.errors import EinitError
from skeleton.measure import Measurement, extents
from skeleton.structs import (ATTR_DEBUG, ATTR_MODE64BIT, DEBUG_MARKER,
                              DEBUG_MARKER_OFFSET, PAGE_SIZE, XFRM_LEGACY,
                              signed_bytes)

BACKEND = "sim"
MEMFD_NAME = "epm-sim-enclave"
# A pooled enclave's memfd travels to other processes: none may resize it.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
SIGSTRUCT_EXPONENT = 3


def build(image, *, attributes=None, xfrm=None, debug=False, host_xcr0=None):
    """Build, initialize and map an enclave from an image; returns the Enclave.

    The SECS attributes and XFRM are the SIGSTRUCT's unless given (as a loader
    may request others); ``debug`` asks for a debug launch (the PAL argument
    ``debug``). ``host_xcr0`` stands in for this host's XCR0 (tests). Raises
    EinitError when ECREATE or EINIT refuses the enclave.
    """
    secs_attributes = image.sigstruct.attributes if attributes is None else attributes
    secs_xfrm = image.sigstruct.xfrm if xfrm is None else xfrm
    if debug:
        secs_attributes |= ATTR_DEBUG
    ecreate_checks(secs_attributes, secs_xfrm,
                   cpu.xcr0() if host_xcr0 is None else host_xcr0)
    geometry = image.geometry
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    reservation = enclave = None
    try:
        os.ftruncate(fd, geometry.enclave_size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        if geometry.encl_offset:
            # NULL-dereference protection: the enclave starts at address 0.
            base = 0
        else:
            base = reserve_aligned(geometry.enclave_size)
            reservation = (base, geometry.enclave_size)

        # ECREATE, then EADD and EEXTEND run by run. The memfd offset is the
        # offset from the enclave base; zero pages are already zero in it.
        measurement = Measurement(geometry.enclave_size, geometry.ssa_frame_pages)
        for offset, flags, data, count in extents(image.data, geometry):
            measurement.add_pages(offset, flags, data, count)
            if data is not None:
                os.pwrite(fd, data, offset)
        einit(image, measurement.digest(), secs_attributes, secs_xfrm)

        start = base + geometry.encl_offset
        layout = [
            LayoutEntry(start, PAGE_SIZE, read=True, write=True, share=True),
            LayoutEntry(start + PAGE_SIZE, geometry.mmap_size - PAGE_SIZE,
                        read=True, write=True, execute=True, share=True),
        ]
        identity = image.identity(BACKEND)._replace(
            attributes=secs_attributes, xfrm=secs_xfrm)
        enclave = Enclave(fd, layout, identity, base=base,
                          reservation=reservation, sigstruct=image.sigstruct)
        enclave.map()
        return enclave
    except BaseException:
        if enclave is not None:
            enclave.close()
        else:
            if reservation:
                release(*reservation)
            os.close(fd)
        raise


def ecreate_checks(attributes, xfrm, host_xcr0):
    """Refuse a SECS that ECREATE would refuse (SDM Vol. 3D, 38.4 ECREATE).

    Raises EinitError for a 32-bit enclave (this runtime only builds 64-bit
    ones, as the published skeleton does) and for XFRM bits that the host's
    XCR0 lacks or that leave out x87|SSE.
    """
    if not attributes & ATTR_MODE64BIT:
        raise EinitError(f"32-bit enclaves are refused: attributes {attributes:#x} "
                         "lack MODE64BIT (bit 2)")
    if xfrm & XFRM_LEGACY != XFRM_LEGACY:
        raise EinitError(f"XFRM {xfrm:#x} lacks x87|SSE ({XFRM_LEGACY:#x}), which "
                         "every enclave must enable")
    missing = xfrm & ~host_xcr0
    if missing:
        raise EinitError(f"XFRM {xfrm:#x} enables state components {missing:#x} "
                         f"that this host's XCR0 {host_xcr0:#x} lacks")


def is_product(sigstruct):
    """Whether a SIGSTRUCT is a product signature: no debug marker in its header."""
    marker = int.from_bytes(
        sigstruct.header[DEBUG_MARKER_OFFSET:DEBUG_MARKER_OFFSET + 4], "little")
    return not marker & DEBUG_MARKER


def einit(image, mrenclave, attributes, xfrm, miscselect=0):
    """Check an enclave's SIGSTRUCT as EINIT does (SDM Vol. 3D, 38.4 EINIT).

    Raises EinitError naming the reason: bad signature, MRENCLAVE mismatch, a
    debug launch of a product signature, or attributes, XFRM or MISCSELECT
    outside the SIGSTRUCT's masks.
    """
    sig = image.sigstruct
    if sig.exponent != SIGSTRUCT_EXPONENT:
        raise EinitError(f"SIGSTRUCT exponent is {sig.exponent}, expected 3")
    modulus = int.from_bytes(sig.modulus, "little")
    signature = int.from_bytes(sig.signature, "little")
    try:
        verified = openssl.rsa_verify_sha256(
            modulus, SIGSTRUCT_EXPONENT, signature.to_bytes(len(sig.signature), "big"),
            signed_bytes(image.sigstruct_bytes))
    except openssl.OpenSSLError as e:
        raise EinitError(f"cannot check the SIGSTRUCT signature: {e}") from None
    if not verified:
        raise EinitError("SIGSTRUCT signature does not verify with its modulus")
    q1 = signature ** 2 // modulus
    q2 = (signature ** 3 - q1 * signature * modulus) // modulus
    if (int.from_bytes(sig.q1, "little"), int.from_bytes(sig.q2, "little")) != (q1, q2):
        raise EinitError("SIGSTRUCT q1/q2 do not match its signature")
    if mrenclave != sig.enclave_hash:
        raise EinitError(f"MRENCLAVE mismatch: measured {mrenclave.hex()}, "
                         f"SIGSTRUCT has {sig.enclave_hash.hex()}")
    # A signature that enforces the debug bit as clear makes hardware refuse a
    # debug launch in the mask check below; say why instead of reporting a
    # bare mask mismatch. A product signature (no debug marker, DESIGN §5)
    # always does; a debug one does when signed without -D.
    if (attributes & ATTR_DEBUG and sig.attributes_mask & ATTR_DEBUG
            and not sig.attributes & ATTR_DEBUG):
        if is_product(sig):
            raise EinitError("a product SIGSTRUCT (signed with -N) cannot launch a "
                             "debug enclave: drop the debug request or sign "
                             "without -N")
        raise EinitError("this SIGSTRUCT does not allow a debug launch: it was "
                         "signed without -D, so its attributes require the debug "
                         "bit clear; drop the debug request (the PAL argument "
                         "`debug`) or sign with -D")
    for name, secs, signed, mask in (
            ("attributes", attributes, sig.attributes, sig.attributes_mask),
            ("XFRM", xfrm, sig.xfrm, sig.xfrm_mask),
            ("MISCSELECT", miscselect, sig.miscselect, sig.miscmask)):
        if secs & mask != signed & mask:
            raise EinitError(f"{name} {secs:#x} outside the SIGSTRUCT's: expected "
                             f"{signed:#x} under mask {mask:#x}")
