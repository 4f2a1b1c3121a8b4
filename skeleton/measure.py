"""MRENCLAVE as the hardware computes it, and the enclave geometry it depends on.

The signer and the sim backend both measure through this module, so the two
agree byte for byte. Records follow the SDM Vol. 3D, 38.7.2 (ECREATE, EADD and
EEXTEND update a SHA-256 of the enclave) and DESIGN §5; page placement follows
the published skeleton (DESIGN §5, "How the published skeleton lays an image out").
"""

import array
import collections
import hashlib
import struct

from skeleton.errors import ImageError
from skeleton.structs import METADATA, PAGE_SIZE, PT_TCS, REG_RWX, TCS

CHUNK = 256  # EEXTEND measures 256 bytes at a time, 16 times per page
_ECREATE = struct.Struct("<8sIQ44x")
# One page's records in one pack: EADD (offset, first 48 bytes of SECINFO), then
# 16 EEXTEND headers (offset, 48 zero bytes) each followed by its 256 data bytes.
_PAGE = struct.Struct("<8sQ48s" + "8sQ48x256s" * (PAGE_SIZE // CHUNK))
_ZERO_PAGE = bytes(PAGE_SIZE)
# Runs of zero pages (SSA frames, padding up to the mmap size: most of a large
# enclave) differ only in their offset fields, so they are hashed in batches
# from a template whose offsets are patched with strided slice assignments,
# one per record kind, instead of packing every page in Python. In u64 units
# a page's records are 648 long; EADD's offset is word 1 and the offset of
# EEXTEND k is word 9 + 40k.
_WORDS_PER_PAGE = _PAGE.size // 8
_OFFSET_WORDS = [(1, 0)] + [(9 + 40 * k, CHUNK * k) for k in range(PAGE_SIZE // CHUNK)]
_ZERO_BATCH = 256

# XSAVE state components as (bit, offset, size) in the standard (non-compacted)
# format, as CPUID leaf 0xD reports them (SDM Vol. 1, 13.4 and 13.5).
_XSAVE_COMPONENTS = (
    (2, 576, 256),     # AVX
    (3, 960, 64),      # MPX BNDREGS
    (4, 1024, 64),     # MPX BNDCSR
    (5, 1088, 64),     # AVX-512 opmask
    (6, 1152, 512),    # AVX-512 ZMM_Hi256
    (7, 1664, 1024),   # AVX-512 Hi16_ZMM
    (9, 2688, 8),      # PKRU
    (17, 2752, 64),    # AMX TILECFG
    (18, 2816, 8192),  # AMX TILEDATA
)
_XSAVE_LEGACY_AND_HEADER = 576
_GPRSGX_SIZE = 184  # SDM Vol. 3D, 34.9.1
_MISC_EXINFO_SIZE = 16  # MISCSELECT bit 0, SDM Vol. 3D, 34.9.2
DEFAULT_NULL_PROTECTION_OFFSET = 16 << 20


def ssa_frame_pages(xfrm, miscselect):
    """Pages of one SSA frame: XSAVE area, MISC region and GPRSGX (SDM 34.9)."""
    xsave = _XSAVE_LEGACY_AND_HEADER
    for bit, offset, size in _XSAVE_COMPONENTS:
        if xfrm & (1 << bit):
            xsave = max(xsave, offset + size)
    misc = _MISC_EXINFO_SIZE if miscselect & 1 else 0
    return -(-(xsave + misc + _GPRSGX_SIZE) // PAGE_SIZE)


def round_up(value, to=PAGE_SIZE):
    return -(-value // to) * to


# image_size: the page-rounded image, metadata page included; encl_offset:
# where the image starts, from the enclave base; mmap_size: the measured bytes
# from encl_offset; enclave_size: SECS.SIZE, a power of two. A named tuple, not
# a dataclass, because the PAL imports it in every container it starts.
class Geometry(collections.namedtuple(
        "Geometry", "image_size encl_offset ssa_frame_pages mmap_size enclave_size")):
    """Where an image's pages go in the enclave, and how big the enclave is."""

    __slots__ = ()

    @classmethod
    def compute(cls, image_size, metadata, xfrm, miscselect):
        """The geometry for a page-rounded image; raises ImageError on bad metadata."""
        ssa = ssa_frame_pages(xfrm, miscselect)
        encl_offset = 0
        if metadata.null_dereference_protection:
            encl_offset = metadata.mmap_min_addr or DEFAULT_NULL_PROTECTION_OFFSET
            if encl_offset % PAGE_SIZE:
                raise ImageError(f"mmap_min_addr {encl_offset:#x} is not page aligned")
        mmap_size = image_size + ssa * PAGE_SIZE
        if metadata.max_mmap_size:
            if metadata.max_mmap_size < mmap_size:
                raise ImageError(f"max_mmap_size {metadata.max_mmap_size} is below the "
                                 f"{mmap_size} bytes of image and SSA frames: "
                                 f"the minimum is {mmap_size} ({mmap_size:#x})")
            mmap_size = round_up(metadata.max_mmap_size)
        enclave_size = PAGE_SIZE
        while enclave_size < mmap_size + encl_offset:
            enclave_size *= 2
        return cls(image_size, encl_offset, ssa, mmap_size, enclave_size)

    @classmethod
    def of_image(cls, data, xfrm, miscselect):
        """The geometry of page-rounded image bytes, reading their metadata page."""
        metadata = METADATA.unpack(data[-PAGE_SIZE:][:METADATA.size])
        return cls.compute(len(data), metadata, xfrm, miscselect)


def tcs_as_added(data, geometry):
    """Page 0 of the image with OSSA and OENTRY set as the loader adds it."""
    tcs = bytearray(data[:PAGE_SIZE])
    TCS.set(tcs, "ossa", geometry.encl_offset + geometry.image_size)
    TCS.set(tcs, "oentry", TCS.get(tcs, "oentry") + geometry.encl_offset)
    return bytes(tcs)


def pages(data, geometry):
    """Every page to add, in order: (offset from base, SECINFO flags, bytes).

    The bytes are None for a page of zeros (SSA frames and the padding up to the
    mmap size), which the sim backend then need not write.
    """
    offset = geometry.encl_offset
    yield offset, PT_TCS, tcs_as_added(data, geometry)
    for start in range(PAGE_SIZE, len(data), PAGE_SIZE):
        yield offset + start, REG_RWX, data[start:start + PAGE_SIZE]
    for start in range(len(data), geometry.mmap_size, PAGE_SIZE):
        yield offset + start, REG_RWX, None


class Measurement:
    """A running MRENCLAVE: ECREATE at construction, then one call per page."""

    def __init__(self, enclave_size, ssa_frame_pages):
        self._hash = hashlib.sha256(
            _ECREATE.pack(b"ECREATE", ssa_frame_pages, enclave_size))
        self._zero_run = None  # [first offset, page count, flags]
        self._templates = {}

    def add_page(self, offset, flags, page=None):
        """EADD one page at an offset from the base, then EEXTEND all of it.

        ``page`` None is a page of zeros; consecutive ones are hashed together.
        """
        if page is None:
            run = self._zero_run
            if run and run[2] == flags and run[0] + run[1] * PAGE_SIZE == offset:
                run[1] += 1
            else:
                self._flush_zero_run()
                self._zero_run = [offset, 1, flags]
            return
        self._flush_zero_run()
        args = [b"EADD", offset, struct.pack("<Q40x", flags)]
        for start in range(0, PAGE_SIZE, CHUNK):
            args += (b"EEXTEND", offset + start, page[start:start + CHUNK])
        self._hash.update(_PAGE.pack(*args))

    def digest(self):
        self._flush_zero_run()
        return self._hash.digest()

    def _flush_zero_run(self):
        if self._zero_run is None:
            return
        offset, count, flags = self._zero_run
        self._zero_run = None
        batch = self._template(flags)
        while count:
            n = min(count, _ZERO_BATCH)
            end = n * _WORDS_PER_PAGE
            for word, delta in _OFFSET_WORDS:
                first = offset + delta
                batch[word:end:_WORDS_PER_PAGE] = array.array(
                    "Q", range(first, first + n * PAGE_SIZE, PAGE_SIZE))
            self._hash.update(memoryview(batch)[:end])
            offset += n * PAGE_SIZE
            count -= n

    def _template(self, flags):
        if flags not in self._templates:
            args = [b"EADD", 0, struct.pack("<Q40x", flags)]
            args += [b"EEXTEND", 0, bytes(CHUNK)] * (PAGE_SIZE // CHUNK)
            self._templates[flags] = array.array("Q", _PAGE.pack(*args) * _ZERO_BATCH)
        return self._templates[flags]


def measure(data, geometry):
    """The MRENCLAVE of page-rounded image bytes laid out by a geometry."""
    measurement = Measurement(geometry.enclave_size, geometry.ssa_frame_pages)
    for offset, flags, page in pages(data, geometry):
        measurement.add_page(offset, flags, page)
    return measurement.digest()
