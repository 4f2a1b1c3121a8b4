"""SGX structures and the skeleton's metadata record, declared once as data.

Offsets come from the Intel SDM Vol. 3D, chapter 34 ("SGX Data Structures")
and from DESIGN.md §5; every layout checks at import that its fields fit and do
not overlap, so a typo fails loudly instead of producing a wrong measurement.
"""

import collections
import struct

PAGE_SIZE = 4096

# SECINFO.FLAGS (SDM 34.11.1): permission bits and the page type in bits 8-15.
SECINFO_R = 0x1
SECINFO_W = 0x2
SECINFO_X = 0x4
PT_TCS = 1 << 8
PT_REG = 2 << 8
REG_RWX = PT_REG | SECINFO_R | SECINFO_W | SECINFO_X

# SECS.ATTRIBUTES flags (SDM 34.7.1).
ATTR_DEBUG = 0x2
ATTR_MODE64BIT = 0x4
XFRM_LEGACY = 0x3  # x87 | SSE, which every enclave must enable

# Fixed SIGSTRUCT headers (SDM 34.14, DESIGN §5).
SIGSTRUCT_HEADER = bytes.fromhex("06000000e10000000000010000000000")
SIGSTRUCT_HEADER2 = bytes.fromhex("01010000600000006000000001000000")
# The published sgxsign marks a debug signature with bit 31 of this u32.
DEBUG_MARKER_OFFSET = 12
DEBUG_MARKER = 1 << 31


class Layout:
    """A fixed-size little-endian structure: fields at offsets, zeros elsewhere."""

    def __init__(self, name, size, fields):
        self.name = name
        self.size = size
        self.fields = {}
        end = 0
        for field, offset, fmt in sorted(fields, key=lambda f: f[1]):
            codec = struct.Struct("<" + fmt)
            if offset < end or offset + codec.size > size:
                raise AssertionError(f"{name}.{field} overlaps or overruns")
            self.fields[field] = (offset, codec)
            end = offset + codec.size
        self.record = collections.namedtuple(name, self.fields)

    def offset(self, field):
        return self.fields[field][0]

    def pack(self, **values):
        """The structure's bytes; fields not given are zero."""
        buf = bytearray(self.size)
        for field, value in values.items():
            offset, codec = self.fields[field]
            codec.pack_into(buf, offset, value)
        return bytes(buf)

    def unpack(self, buf):
        """A named tuple of every field; raises ValueError on a wrong length."""
        if len(buf) != self.size:
            raise ValueError(f"{self.name} is {self.size} bytes, got {len(buf)}")
        return self.record(*(codec.unpack_from(buf, offset)[0]
                             for offset, codec in self.fields.values()))

    def get(self, buf, field, base=0):
        offset, codec = self.fields[field]
        return codec.unpack_from(buf, base + offset)[0]

    def set(self, buf, field, value, base=0):
        offset, codec = self.fields[field]
        codec.pack_into(buf, base + offset, value)


# SDM 34.7: SGX Enclave Control Structure, one page.
SECS = Layout("Secs", PAGE_SIZE, [
    ("size", 0, "Q"), ("baseaddr", 8, "Q"), ("ssaframesize", 16, "I"),
    ("miscselect", 20, "I"), ("attributes", 48, "Q"), ("xfrm", 56, "Q"),
    ("mrenclave", 64, "32s"), ("mrsigner", 128, "32s"), ("config_id", 192, "64s"),
    ("isvprodid", 256, "H"), ("isvsvn", 258, "H"), ("config_svn", 260, "H"),
])

# SDM 34.8: Thread Control Structure, one page.
TCS = Layout("Tcs", PAGE_SIZE, [
    ("state", 0, "Q"), ("flags", 8, "Q"), ("ossa", 16, "Q"), ("cssa", 24, "I"),
    ("nssa", 28, "I"), ("oentry", 32, "Q"), ("aep", 40, "Q"), ("ofsbase", 48, "Q"),
    ("ogsbase", 56, "Q"), ("fslimit", 64, "I"), ("gslimit", 68, "I"),
])

# The skeleton's entry record (skeleton/enclave/encl.c), at the start of the page
# after the TCS: a magic and the offset of the C body from the image start. The
# sim backend calls the body through it, because it cannot run the ENCLU
# instructions of the entry stub at OENTRY.
ENTRY_RECORD = Layout("EntryRecord", 16, [("magic", 0, "8s"), ("body", 8, "Q")])
ENTRY_RECORD_OFFSET = PAGE_SIZE
ENTRY_RECORD_MAGIC = b"EPMBODY\0"

# SDM 34.11: security information of an added page.
SECINFO = Layout("Secinfo", 64, [("flags", 0, "Q")])

# SDM 34.14 and DESIGN §5: the enclave signature structure.
SIGSTRUCT = Layout("Sigstruct", 1808, [
    ("header", 0, "16s"), ("vendor", 16, "I"), ("date", 20, "I"),
    ("header2", 24, "16s"), ("swdefined", 40, "I"), ("modulus", 128, "384s"),
    ("exponent", 512, "I"), ("signature", 516, "384s"), ("miscselect", 900, "I"),
    ("miscmask", 904, "I"), ("attributes", 928, "Q"), ("xfrm", 936, "Q"),
    ("attributes_mask", 944, "Q"), ("xfrm_mask", 952, "Q"),
    ("enclave_hash", 960, "32s"), ("isvprodid", 1024, "H"), ("isvsvn", 1026, "H"),
    ("q1", 1040, "384s"), ("q2", 1424, "384s"),
])
# The RSA signature covers these two ranges, concatenated (SDM 34.14).
SIGNED_RANGES = ((0, 128), (900, 1028))

# DESIGN §5: the skeleton's metadata record, packed, at the start of the image's
# last page.
METADATA = Layout("Metadata", 17, [
    ("max_mmap_size", 0, "Q"), ("null_dereference_protection", 8, "B"),
    ("mmap_min_addr", 9, "Q"),
])


# SDM 34.17: TARGETINFO, the enclave a REPORT is meant for (512 bytes).
TARGETINFO = Layout("Targetinfo", 512, [
    ("mrenclave", 0, "32s"), ("attributes", 32, "Q"), ("xfrm", 40, "Q"),
    ("config_svn", 50, "H"), ("miscselect", 52, "I"), ("config_id", 64, "64s"),
])

# SDM 34.18: REPORT, 384 bytes of REPORTBODY, then KEYID and the MAC over the
# body (432 bytes).
REPORT = Layout("Report", 432, [
    ("cpusvn", 0, "16s"), ("miscselect", 16, "I"), ("isvextprodid", 32, "16s"),
    ("attributes", 48, "Q"), ("xfrm", 56, "Q"), ("mrenclave", 64, "32s"),
    ("mrsigner", 128, "32s"), ("config_id", 192, "64s"), ("isvprodid", 256, "H"),
    ("isvsvn", 258, "H"), ("config_svn", 260, "H"), ("isvfamilyid", 304, "16s"),
    ("report_data", 320, "64s"), ("keyid", 384, "32s"), ("mac", 416, "16s"),
])
REPORT_BODY_SIZE = 384
REPORT_DATA_SIZE = 64


def signed_bytes(sigstruct):
    """The bytes of a SIGSTRUCT that its RSA signature covers."""
    return b"".join(sigstruct[start:end] for start, end in SIGNED_RANGES)


assert SIGSTRUCT.size == 1808 and SIGSTRUCT.offset("q2") + 384 == 1808
assert REPORT.offset("keyid") == REPORT_BODY_SIZE and REPORT.size == 432
assert TARGETINFO.size == 512 and REPORT.offset("report_data") + 64 == 384
assert METADATA.size == struct.calcsize("<QBQ") == 17
