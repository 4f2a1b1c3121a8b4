"""Reading a signed skeleton image: ``encl.bin`` and its SIGSTRUCT ``encl.ss``."""

import dataclasses
import hashlib
import pathlib

from epm_client.types import Identity
from skeleton.errors import ImageError
from skeleton.measure import Geometry, round_up
from skeleton.structs import (METADATA, PAGE_SIZE, SIGSTRUCT, SIGSTRUCT_HEADER,
                              SIGSTRUCT_HEADER2, TCS)

IMAGE_NAME = "encl.bin"
SIGSTRUCT_NAME = "encl.ss"
# The TCS page and the page holding the metadata record.
MIN_IMAGE_PAGES = 2


@dataclasses.dataclass(frozen=True)
class EnclaveImage:
    """An image as signed: its pages, metadata, SIGSTRUCT and enclave geometry."""

    data: bytes            # page-rounded encl.bin, metadata record included
    metadata: tuple        # structs.METADATA record
    sigstruct: tuple       # structs.SIGSTRUCT record
    sigstruct_bytes: bytes
    geometry: Geometry

    @property
    def encl_offset(self):
        return self.geometry.encl_offset

    @property
    def mmap_size(self):
        return self.geometry.mmap_size

    @property
    def enclave_size(self):
        return self.geometry.enclave_size

    @property
    def ssa_frame_pages(self):
        return self.geometry.ssa_frame_pages

    @property
    def mrsigner(self):
        """SHA-256 of the signer's modulus as stored: 384 bytes, little-endian."""
        return hashlib.sha256(self.sigstruct.modulus).digest()

    def identity(self, backend):
        """The pool identity of any enclave built from this image on a backend."""
        return Identity(mrenclave=self.sigstruct.enclave_hash, mrsigner=self.mrsigner,
                        attributes=self.sigstruct.attributes,
                        xfrm=self.sigstruct.xfrm, size=self.enclave_size,
                        backend=backend)


def read_pages(path):
    """The bytes of an image file rounded up to whole pages; raises ImageError."""
    path = pathlib.Path(path)
    data = _read(path)
    if len(data) <= (MIN_IMAGE_PAGES - 1) * PAGE_SIZE:
        raise ImageError(f"{path}: {len(data)} bytes is too small for a TCS page "
                         "and a metadata page")
    return data + bytes(round_up(len(data)) - len(data))


def load_image(directory):
    """Read ``encl.bin`` and ``encl.ss`` from a directory.

    Returns an EnclaveImage; raises ImageError naming the file that is missing
    or malformed.
    """
    directory = pathlib.Path(directory)
    image_path = directory / IMAGE_NAME
    sigstruct_path = directory / SIGSTRUCT_NAME
    data = read_pages(image_path)
    raw = _read(sigstruct_path)
    if len(raw) != SIGSTRUCT.size:
        raise ImageError(f"{sigstruct_path}: expected a {SIGSTRUCT.size}-byte "
                         f"SIGSTRUCT, got {len(raw)} bytes")
    sigstruct = SIGSTRUCT.unpack(raw)
    # Bit 31 of the header's last u32 is the published signer's debug marker.
    if (sigstruct.header[:12] != SIGSTRUCT_HEADER[:12]
            or sigstruct.header2 != SIGSTRUCT_HEADER2):
        raise ImageError(f"{sigstruct_path}: not a SIGSTRUCT (bad header)")

    metadata = METADATA.unpack(data[-PAGE_SIZE:][:METADATA.size])
    try:
        geometry = Geometry.compute(len(data), metadata, sigstruct.xfrm,
                                    sigstruct.miscselect)
    except ImageError as e:
        raise ImageError(f"{image_path}: {e}") from None
    oentry = TCS.get(data, "oentry")
    if not PAGE_SIZE <= oentry < len(data):
        raise ImageError(f"{image_path}: TCS OENTRY {oentry:#x} is outside the image")
    return EnclaveImage(data=data, metadata=metadata, sigstruct=sigstruct,
                        sigstruct_bytes=raw, geometry=geometry)


def _read(path):
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None
