"""What the pool knows about an enclave, and the checks on it from a request.

The values here are plain and immutable so that the pool can hand copies out
without a lock; ``*_from_proto`` validate a request's fields and raise
InvalidArgument naming the field and the bad value.
"""

import dataclasses

from epm_api import v1alpha1_pb2 as pb
from epm_server.errors import InvalidArgument, shown

PAGE_SIZE = 4096
# Page 0 is never mapped (vm.mmap_min_addr): an enclave that starts at 0 for
# NULL-dereference protection has its first mapped page above it.
MIN_ADDR = PAGE_SIZE
MAX_LAYOUT_ENTRIES = 64
MAX_SUBTYPE_LEN = 128
BACKENDS = ("sim", "sgx")
_HASH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Identity:
    """What makes two enclaves interchangeable: all fields must match."""

    mrenclave: bytes
    mrsigner: bytes
    attributes: int
    xfrm: int
    size: int
    backend: str

    def to_proto(self):
        """The ``v1alpha1.EnclaveIdentity`` message for this identity."""
        return pb.EnclaveIdentity(
            mrenclave=self.mrenclave, mrsigner=self.mrsigner,
            attributes=self.attributes, xfrm=self.xfrm, size=self.size,
            backend=self.backend)


@dataclasses.dataclass(frozen=True)
class LayoutEntry:
    """One range a client maps, with the protection bits of the wire format."""

    addr: int
    size: int
    read: bool
    write: bool
    execute: bool
    share: bool
    private: bool

    def to_proto(self):
        """The ``v1alpha1.Enclavelayout`` message for this range."""
        return pb.Enclavelayout(addr=self.addr, size=self.size, prot=pb.EnclavePerms(
            read=self.read, write=self.write, execute=self.execute,
            share=self.share, private=self.private))


def enclave_proto(layout, identity, fd=-1, state=""):
    """An ``Enclave`` message; ``identity`` may be None (legacy check-ins)."""
    msg = pb.Enclave(fd=fd, nr=len(layout),
                     layout=[entry.to_proto() for entry in layout], state=state)
    if identity is not None:
        msg.identity.CopyFrom(identity.to_proto())
    return msg


def subtype_from_request(subtype, field="subtype"):
    """Return ``subtype`` if it is 1..128 printable characters.

    Raises InvalidArgument naming ``field``.
    """
    if not subtype:
        raise InvalidArgument(f"{field}: must not be empty")
    if len(subtype) > MAX_SUBTYPE_LEN:
        raise InvalidArgument(
            f"{field}: {len(subtype)} characters, at most {MAX_SUBTYPE_LEN}")
    if not subtype.isprintable():
        raise InvalidArgument(f"{field}: {shown(subtype, quoted=True)} has unprintable characters")
    return subtype


def identity_from_proto(msg, field="identity"):
    """Return the Identity in an ``EnclaveIdentity`` message.

    Raises InvalidArgument when a hash is not 32 bytes, the size is not a
    power of two of at least one page, or the backend is unknown.
    """
    for name in ("mrenclave", "mrsigner"):
        value = getattr(msg, name)
        if len(value) != _HASH_SIZE:
            raise InvalidArgument(
                f"{field}.{name}: expected {_HASH_SIZE} bytes, got {len(value)}")
    if msg.size < PAGE_SIZE or msg.size & (msg.size - 1):
        raise InvalidArgument(
            f"{field}.size: expected a power of two >= {PAGE_SIZE}, got {msg.size}")
    if msg.backend not in BACKENDS:
        raise InvalidArgument(
            f"{field}.backend: expected one of {', '.join(BACKENDS)}, "
            f"got {shown(msg.backend, quoted=True)}")
    return Identity(mrenclave=bytes(msg.mrenclave), mrsigner=bytes(msg.mrsigner),
                    attributes=msg.attributes, xfrm=msg.xfrm, size=msg.size,
                    backend=msg.backend)


def layout_from_proto(msg, field="enclave"):
    """Return the layout of an ``Enclave`` message as a tuple of LayoutEntry.

    Raises InvalidArgument unless there are 1..64 page-aligned, non-empty,
    non-overlapping ranges from page 1 to 2**64, and ``nr`` (when set)
    counts them.
    """
    count = len(msg.layout)
    if msg.nr and msg.nr != count:
        raise InvalidArgument(f"{field}.nr: {msg.nr} but the layout has {count} "
                              "entries")
    if not 1 <= count <= MAX_LAYOUT_ENTRIES:
        raise InvalidArgument(f"{field}.layout: expected 1 to {MAX_LAYOUT_ENTRIES} "
                              f"entries, got {count}")
    layout = []
    for i, item in enumerate(msg.layout):
        name = f"{field}.layout[{i}]"
        if item.addr % PAGE_SIZE or item.size % PAGE_SIZE:
            raise InvalidArgument(f"{name}: addr {item.addr:#x} and size "
                                  f"{item.size:#x} must be page-aligned")
        if item.size == 0:
            raise InvalidArgument(f"{name}.size: must not be 0")
        if item.addr < MIN_ADDR:
            raise InvalidArgument(f"{name}.addr: {item.addr:#x} is below "
                                  f"{MIN_ADDR:#x}; page 0 is never mapped")
        if item.addr + item.size > 2 ** 64:
            raise InvalidArgument(f"{name}: addr {item.addr:#x} + size "
                                  f"{item.size:#x} wraps past 2**64")
        p = item.prot
        layout.append(LayoutEntry(addr=item.addr, size=item.size, read=p.read,
                                  write=p.write, execute=p.execute,
                                  share=p.share, private=p.private))
    ordered = sorted(layout, key=lambda e: e.addr)
    for before, after in zip(ordered, ordered[1:]):
        if before.addr + before.size > after.addr:
            raise InvalidArgument(f"{field}.layout: ranges at {before.addr:#x} and "
                                  f"{after.addr:#x} overlap")
    return tuple(layout)


def check_layout_fits(layout, size, field="enclave.layout"):
    """Check that every range of ``layout`` lies in one enclave of ``size`` bytes.

    The enclave is naturally aligned (SGX requires a base that is a multiple
    of its power-of-two size), so the window is ``[base, base + size)`` with
    ``base`` the first range's address rounded down to ``size``. A consumer
    maps each range of the fd: one outside the window would map memory the
    enclave does not have, or over the consumer's own. Raises
    InvalidArgument naming the range.
    """
    base = layout[0].addr - layout[0].addr % size
    for i, item in enumerate(layout):
        if item.addr < base or item.addr + item.size > base + size:
            raise InvalidArgument(
                f"{field}[{i}]: {item.addr:#x} + {item.size:#x} lies outside the "
                f"enclave's {size:#x} bytes at {base:#x}")
