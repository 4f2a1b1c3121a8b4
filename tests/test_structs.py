"""The SGX structure layouts: sizes and offsets as the SDM and DESIGN §5 give them."""

import pytest

from skeleton import structs


def test_sigstruct_offsets_match_the_sdm():
    s = structs.SIGSTRUCT
    assert s.size == 1808
    assert [s.offset(f) for f in ("modulus", "exponent", "signature", "miscselect",
                                  "attributes", "enclave_hash", "q1", "q2")] == \
        [128, 512, 516, 900, 928, 960, 1040, 1424]


def test_metadata_record_is_17_packed_bytes():
    raw = structs.METADATA.pack(max_mmap_size=0x800000, null_dereference_protection=1,
                                mmap_min_addr=0x10000)
    assert raw == (0x800000).to_bytes(8, "little") + b"\x01" \
        + (0x10000).to_bytes(8, "little")
    assert structs.METADATA.unpack(raw).mmap_min_addr == 0x10000


def test_tcs_and_secs_are_one_page_with_sdm_offsets():
    assert structs.TCS.size == structs.SECS.size == structs.PAGE_SIZE
    assert (structs.TCS.offset("ossa"), structs.TCS.offset("oentry")) == (16, 32)
    assert structs.SECS.offset("attributes") == 48


def test_unpack_refuses_a_wrong_length():
    with pytest.raises(ValueError, match="1808 bytes, got 1807"):
        structs.SIGSTRUCT.unpack(bytes(1807))


def test_overlapping_fields_are_refused_at_declaration():
    with pytest.raises(AssertionError, match="Bad.b overlaps"):
        structs.Layout("Bad", 16, [("a", 0, "Q"), ("b", 4, "Q")])


def test_signed_bytes_are_header_and_body_ranges():
    sigstruct = bytes(range(256)) * 7 + bytes(16)
    assert structs.signed_bytes(sigstruct) == sigstruct[:128] + sigstruct[900:1028]
