"""MRENCLAVE and enclave geometry, checked against records written here by hand."""

import hashlib
import struct

import pytest

from skeleton import measure
from skeleton.errors import ImageError
from skeleton.structs import METADATA

PAGE = 4096


def _image(pages, max_mmap_size=0, oentry=0x1000):
    """A page-rounded image: a TCS page, code pages, the metadata page."""
    tcs = bytearray(PAGE)
    struct.pack_into("<Q", tcs, 32, oentry)
    code = bytes((i * 7) % 251 for i in range(PAGE * pages))
    meta = struct.pack("<QBQ", max_mmap_size, 0, 0).ljust(PAGE, b"\0")
    return bytes(tcs) + code + meta


def _expected_mrenclave(image, enclave_size, mmap_size):
    """MRENCLAVE written out from DESIGN §5's record table, independently."""
    h = hashlib.sha256(b"ECREATE\0" + struct.pack("<IQ", 1, enclave_size)
                       + bytes(44))

    def add(offset, flags, page):
        h.update(b"EADD\0\0\0\0" + struct.pack("<QQ", offset, flags) + bytes(40))
        for chunk in range(0, PAGE, 256):
            h.update(b"EEXTEND\0" + struct.pack("<Q", offset + chunk) + bytes(48)
                     + page[chunk:chunk + 256])

    tcs = bytearray(image[:PAGE])
    struct.pack_into("<Q", tcs, 16, len(image))  # OSSA: right after the image
    add(0, 0x100, bytes(tcs))
    for offset in range(PAGE, len(image), PAGE):
        add(offset, 0x207, image[offset:offset + PAGE])
    for offset in range(len(image), mmap_size, PAGE):
        add(offset, 0x207, bytes(PAGE))
    return h.digest()


def test_mrenclave_of_a_small_image_matches_the_records():
    image = _image(2)
    geometry = measure.Geometry.of_image(image, xfrm=3, miscselect=0)

    got = measure.measure(image, geometry)

    assert geometry.mmap_size == len(image) + PAGE  # one SSA frame
    assert geometry.enclave_size == 32768
    assert got == _expected_mrenclave(image, 32768, geometry.mmap_size)


def test_mrenclave_measures_zero_pages_up_to_max_mmap_size():
    image = _image(1, max_mmap_size=1 << 20)
    geometry = measure.Geometry.of_image(image, xfrm=3, miscselect=0)

    assert measure.measure(image, geometry) == \
        _expected_mrenclave(image, 1 << 20, 1 << 20)


def test_enclave_size_is_the_next_power_of_two():
    meta = METADATA.unpack(struct.pack("<QBQ", 80 << 20, 0, 0))
    geometry = measure.Geometry.compute(3 * PAGE, meta, 3, 0)
    assert (geometry.mmap_size, geometry.enclave_size) == (80 << 20, 128 << 20)


def test_null_dereference_protection_offsets_the_image():
    meta = METADATA.unpack(struct.pack("<QBQ", 8 << 20, 1, 0))
    geometry = measure.Geometry.compute(3 * PAGE, meta, 3, 0)
    assert geometry.encl_offset == 16 << 20
    assert geometry.enclave_size == 32 << 20

    extents = list(measure.extents(_image(1, 8 << 20), geometry))
    tcs = extents[0][2]
    assert extents[0][0] == 16 << 20
    assert struct.unpack_from("<Q", tcs, 16)[0] == (16 << 20) + 3 * PAGE
    assert struct.unpack_from("<Q", tcs, 32)[0] == (16 << 20) + 0x1000


def test_max_mmap_size_below_the_image_is_refused():
    meta = METADATA.unpack(struct.pack("<QBQ", PAGE, 0, 0))
    with pytest.raises(ImageError, match="max_mmap_size 4096 is below"):
        measure.Geometry.compute(3 * PAGE, meta, 3, 0)


@pytest.mark.parametrize("xfrm, miscselect, pages", [
    (0x3, 0, 1), (0x7, 0, 1), (0xe7, 1, 1), (0x60007, 0, 3)])
def test_ssa_frame_size_follows_xfrm(xfrm, miscselect, pages):
    assert measure.ssa_frame_pages(xfrm, miscselect) == pages


def _records(offset, flags, page):
    """One page's EADD and EEXTEND records, as in DESIGN §5's table."""
    out = b"EADD\0\0\0\0" + struct.pack("<QQ", offset, flags) + bytes(40)
    for chunk in range(0, PAGE, 256):
        out += (b"EEXTEND\0" + struct.pack("<Q", offset + chunk) + bytes(48)
                + page[chunk:chunk + 256])
    return out


def _page_by_page(enclave_size, runs):
    h = hashlib.sha256(b"ECREATE\0" + struct.pack("<IQ", 1, enclave_size)
                       + bytes(44))
    for offset, flags, data, count in runs:
        for i in range(count):
            page = bytes(PAGE) if data is None else data[i * PAGE:(i + 1) * PAGE]
            h.update(_records(offset + i * PAGE, flags, page))
    return h.digest()


# Runs that start and end inside a 1 MiB window, span several windows, cross
# the 16 MiB boundary where the offsets' byte 3 changes, and go back to an
# earlier window with the other kind of page.
_RUNS = [
    (0x3000, 0x100, None, 1),
    (0x4000, 0x207, None, 300),
    (0xff000, 0x207, bytes(range(256)) * 16 * 3, 3),
    (0x200000, 0x207, bytes((i * 13) % 251 for i in range(PAGE * 20)), 20),
    (0xf80000, 0x207, None, 700),
    (0x1000000 - 0x2000, 0x207, bytes((i * 7) % 253 for i in range(PAGE * 9)), 9),
    (0x500000, 0x207, None, 2),
    (0x7ff0000, 0x207, None, 16),
]


def test_runs_of_pages_hash_like_records_written_page_by_page():
    """Windows of zero and data pages give the records of DESIGN §5 exactly."""
    measurement = measure.Measurement(1 << 27, 1)

    for offset, flags, data, count in _RUNS:
        measurement.add_pages(offset, flags, data, count)

    assert measurement.digest() == _page_by_page(1 << 27, _RUNS)


def test_single_pages_hash_like_runs():
    runs = [(0x4000, 0x207, None, 3), (0x7000, 0x207, b"\x01" * PAGE * 10, 10)]
    single = measure.Measurement(1 << 24, 1)

    for offset, flags, data, count in runs:
        for i in range(count):
            page = None if data is None else data[i * PAGE:(i + 1) * PAGE]
            single.add_page(offset + i * PAGE, flags, page)

    assert single.digest() == _page_by_page(1 << 24, runs)
