"""MRENCLAVE as the hardware computes it, and the enclave geometry it depends on.

The signer and the sim backend both measure through this module, so the two
agree byte for byte. Records follow the SDM Vol. 3D, 38.7.2 (ECREATE, EADD and
EEXTEND update a SHA-256 of the enclave) and DESIGN §5; page placement follows
the published skeleton (DESIGN §5, "How the published skeleton lays an image out").
"""

import collections
import hashlib
import struct

from skeleton.errors import ImageError
from skeleton.structs import METADATA, PAGE_SIZE, PT_TCS, REG_RWX, TCS

CHUNK = 256  # EEXTEND measures 256 bytes at a time, 16 times per page
_CHUNKS_PER_PAGE = PAGE_SIZE // CHUNK
_ECREATE = struct.Struct("<8sIQ44x")
# One page's records in one pack: EADD (offset, first 48 bytes of SECINFO), then
# 16 EEXTEND headers (offset, 48 zero bytes) each followed by its 256 data bytes.
_PAGE = struct.Struct("<8sQ48s" + "8sQ48x256s" * _CHUNKS_PER_PAGE)
_EADD_SIZE = 64
_EEXTEND_SIZE = 64 + CHUNK
# Where each record's u64 offset field sits in a page's records, and what it
# adds to the page offset: EADD's, then EEXTEND k's.
_OFFSET_FIELDS = ((8, 0),) + tuple(
    (_EADD_SIZE + _EEXTEND_SIZE * k + 8, CHUNK * k) for k in range(_CHUNKS_PER_PAGE))

# Pages are measured through windows: the records of _WINDOW_PAGES consecutive
# pages built once and fed to SHA-256 in one update, which is what keeps a
# build near the speed of the hash (issue 7). A window covers enclave offsets
# aligned to its 1 MiB, so slot j holds the page at offset window + j pages:
# bits 0-19 of every offset field are fixed by the slot and the record, and
# moving the window rewrites only bits 20 and up, byte-wise across all slots
# at once (one strided slice assignment per record and byte).
_WINDOW_PAGES = 256  # 1 MiB of enclave: offset bits 12-19 name the slot
# Data pages are copied into their slot with the EEXTEND headers between the
# chunks read back from the window: 16 chunks and 15 headers in one pack.
_CHUNKS = struct.Struct(f"{CHUNK}s" * _CHUNKS_PER_PAGE)
_HEADERS_BETWEEN = struct.Struct(
    f"64s{CHUNK}x" * (_CHUNKS_PER_PAGE - 2) + "64s")
_PAGE_BODY = struct.Struct(f"{CHUNK}s64s" * (_CHUNKS_PER_PAGE - 1) + f"{CHUNK}s")
_BODY_AT = _EADD_SIZE + 64  # chunk 0's data, after EADD and EEXTEND 0's header
# Below this many data pages a page is packed on its own (the TCS page):
# building a data window costs more than packing a few pages.
_FEW_PAGES = 8

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


def extents(data, geometry):
    """What to add, in order, as runs of pages: (offset from base, SECINFO
    flags, bytes or None, page count).

    The TCS page, then the rest of the image, then the zero pages (SSA frames
    and the padding up to the mmap size) as None, which the sim backend need
    not write: they are already zero in a fresh memfd.
    """
    offset = geometry.encl_offset
    yield offset, PT_TCS, tcs_as_added(data, geometry), 1
    yield (offset + PAGE_SIZE, REG_RWX, memoryview(data)[PAGE_SIZE:],
           len(data) // PAGE_SIZE - 1)
    yield (offset + len(data), REG_RWX, None,
           (geometry.mmap_size - len(data)) // PAGE_SIZE)


class _Window:
    """The records of _WINDOW_PAGES pages with one SECINFO; in window w, slot
    j holds the page at enclave offset (w * _WINDOW_PAGES + j) pages."""

    def __init__(self, flags):
        page = _PAGE.pack(b"EADD", 0, struct.pack("<Q40x", flags),
                          *(b"EEXTEND", 0, bytes(CHUNK)) * _CHUNKS_PER_PAGE)
        self.records = bytearray(page) * _WINDOW_PAGES
        self.view = memoryview(self.records)
        # Bits 0-19 of slot j's fields: byte 0 is zero (the deltas are whole
        # chunks), byte 1 is (j % 16) << 4 plus the chunk index, and byte 2
        # (j >> 4, with the window's low bits) is written by move().
        for field, delta in _OFFSET_FIELDS:
            self.records[field + 1::_PAGE.size] = bytes(
                range(delta // CHUNK, 256, 16)) * 16
        self.window = None
        self._args = [None] * (2 * _CHUNKS_PER_PAGE - 1)

    def move(self, window):
        """Point the slots' offset fields at another window."""
        if window == self.window:
            return
        records, stride = self.records, _PAGE.size
        byte2 = _byte2(window & 0xf)
        for field, _ in _OFFSET_FIELDS:
            records[field + 2::stride] = byte2
        high = window >> 4
        if self.window is None or high != self.window >> 4:
            for i, value in enumerate(high.to_bytes(5, "little"), start=3):
                fill = bytes((value,)) * _WINDOW_PAGES
                for field, _ in _OFFSET_FIELDS:
                    records[field + i::stride] = fill
        self.window = window

    def fill(self, slot, data, at):
        """Copy the page at ``data[at:]`` into a slot's EEXTEND chunks."""
        start = slot * _PAGE.size + _BODY_AT
        args = self._args
        args[0::2] = _CHUNKS.unpack_from(data, at)
        args[1::2] = _HEADERS_BETWEEN.unpack_from(self.records, start + CHUNK)
        _PAGE_BODY.pack_into(self.records, start, *args)


_BYTE2 = {}


def _byte2(nibble):
    """Byte 2 of the offset fields of slots 0-255 in a window whose number
    ends in ``nibble``: bits 16-19 from the slot, 20-23 from the window."""
    if nibble not in _BYTE2:
        _BYTE2[nibble] = bytes(nibble << 4 | j >> 4 for j in range(_WINDOW_PAGES))
    return _BYTE2[nibble]


class Measurement:
    """A running MRENCLAVE: ECREATE at construction, then runs of pages."""

    def __init__(self, enclave_size, ssa_frame_pages):
        self._hash = hashlib.sha256(
            _ECREATE.pack(b"ECREATE", ssa_frame_pages, enclave_size))
        # Windows by (SECINFO flags, whether they carry data): a zero window's
        # chunks stay zero.
        self._windows = {}

    def add_pages(self, offset, flags, data=None, count=1):
        """EADD ``count`` pages from an offset from the base, EEXTEND all of them.

        ``data`` holds the pages' bytes (``count`` pages of them); None is
        pages of zeros. ``offset`` must be page aligned.
        """
        if data is not None and count < _FEW_PAGES:
            for i in range(count):
                self._pack_page(offset + i * PAGE_SIZE, flags,
                                bytes(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]))
            return
        key = (flags, data is not None)
        if key not in self._windows:
            self._windows[key] = _Window(flags)
        window = self._windows[key]
        page, done = offset // PAGE_SIZE, 0
        while done < count:
            slot = page % _WINDOW_PAGES
            n = min(count - done, _WINDOW_PAGES - slot)
            window.move(page // _WINDOW_PAGES)
            if data is not None:
                for i in range(n):
                    window.fill(slot + i, data, (done + i) * PAGE_SIZE)
            self._hash.update(window.view[slot * _PAGE.size:(slot + n) * _PAGE.size])
            page += n
            done += n

    def add_page(self, offset, flags, page=None):
        """EADD one page at an offset from the base, then EEXTEND all of it."""
        self.add_pages(offset, flags, page, 1)

    def digest(self):
        return self._hash.digest()

    def _pack_page(self, offset, flags, page):
        args = [b"EADD", offset, struct.pack("<Q40x", flags)]
        for start in range(0, PAGE_SIZE, CHUNK):
            args += (b"EEXTEND", offset + start, page[start:start + CHUNK])
        self._hash.update(_PAGE.pack(*args))


def measure(data, geometry):
    """The MRENCLAVE of page-rounded image bytes laid out by a geometry."""
    measurement = Measurement(geometry.enclave_size, geometry.ssa_frame_pages)
    for offset, flags, pages, count in extents(data, geometry):
        measurement.add_pages(offset, flags, pages, count)
    return measurement.digest()
