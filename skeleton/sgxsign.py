"""``sgxsign``: sign a skeleton enclave image, writing its SIGSTRUCT (encl.ss).

The signer first writes the metadata record (mmap size, NULL-dereference
protection) into the image in place, then measures the image as the loader
will lay it out and signs the SIGSTRUCT with an RSA-3072 key of exponent 3.
Writing in place is what the published signer does, and what keeps one image
file and its SIGSTRUCT a pair; the command refuses to change metadata that an
earlier signing wrote unless told to (``--rewrite-metadata``), because every
SIGSTRUCT made for the old values would silently stop matching the image.
"""

import argparse
import datetime
import os
import pathlib
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from skeleton.errors import ImageError, SigningError
from skeleton.image import (MAX_ENCLAVE_SIZE, MMAP_MIN_ADDR_PATH, read_file,
                            read_pages)
from skeleton.image import host_mmap_min_addr as _read_mmap_min_addr
from skeleton.measure import Geometry, measure
from skeleton.structs import (ATTR_DEBUG, ATTR_MODE64BIT, DEBUG_MARKER,
                              DEBUG_MARKER_OFFSET, METADATA, PAGE_SIZE, SIGSTRUCT,
                              SIGSTRUCT_HEADER, SIGSTRUCT_HEADER2, XFRM_LEGACY,
                              signed_bytes)

KEY_BITS = 3072
EXPONENT = 3  # SGX requires e = 3 (SDM Vol. 3D, 34.14)
ALL_ONES = (1 << 64) - 1
MODULUS_BYTES = KEY_BITS // 8
# A PEM RSA-3072 private key is about 2.5 KiB; anything much larger is not one.
MAX_KEY_FILE_SIZE = 64 << 10


def generate_key(path):
    """Write a new RSA-3072 private key with e=3 as PEM to a new file, mode 0600.

    Raises SigningError when ``path`` exists, even as a symbolic link: an
    existing file would keep its mode (perhaps world-readable) and lose
    whatever it held.
    """
    key = rsa.generate_private_key(public_exponent=EXPONENT, key_size=KEY_BITS)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise SigningError(f"{path}: already exists; --genkey writes only a new "
                           "file (remove it or choose another path)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_key(path):
    """The RSA private key in a PEM file; raises SigningError unless SGX can use it."""
    try:
        pem = read_file(path, MAX_KEY_FILE_SIZE)
    except ImageError as e:
        raise SigningError(f"cannot read key: {e}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise SigningError(f"{path}: not a PEM private key: {e}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SigningError(f"{path}: expected an RSA key")
    if key.key_size != KEY_BITS or key.public_key().public_numbers().e != EXPONENT:
        raise SigningError(f"{path}: expected RSA-{KEY_BITS} with exponent "
                           f"{EXPONENT}, got RSA-{key.key_size} with exponent "
                           f"{key.public_key().public_numbers().e}")
    return key


def bcd_date(day):
    """A date as the BCD u32 yyyymmdd, e.g. 2024-05-17 -> 0x20240517."""
    return int(day.strftime("%Y%m%d"), 16)


def host_mmap_min_addr(path=MMAP_MIN_ADDR_PATH):
    """The host's ``vm.mmap_min_addr``; raises SigningError when unreadable."""
    try:
        return _read_mmap_min_addr(path)
    except ImageError as e:
        raise SigningError(f"{e}; give it with -m") from None


def implied_pair(value, mask, default_value, default_mask):
    """An attribute (or XFRM) value and its mask, each implied by the other.

    As the published signer does, a value given alone is also its mask (only
    the bits it sets are enforced), and a mask given alone is also the value.
    """
    if value is None and mask is None:
        return default_value, default_mask
    if mask is None:
        return value, value
    if value is None:
        return mask, mask
    return value, mask


def check_options(attributes, attributes_mask, xfrm, product):
    """Refuse what hardware would refuse or what would defeat a product enclave."""
    if not attributes & ATTR_MODE64BIT:
        raise SigningError(f"attributes {attributes:#x} lack 64-bit mode (bit 2), "
                           "which the skeleton requires")
    if not attributes_mask & ATTR_MODE64BIT:
        raise SigningError(f"attributes mask {attributes_mask:#x} does not enforce "
                           "64-bit mode (bit 2): a 32-bit enclave would pass EINIT")
    if xfrm & XFRM_LEGACY != XFRM_LEGACY:
        raise SigningError(f"xfrm {xfrm:#x} lacks the legacy x87|SSE state "
                           f"({XFRM_LEGACY:#x}), the minimum")
    if product and attributes & ATTR_DEBUG:
        raise SigningError("a product enclave (-N) must not have the debug attribute")
    if product and not attributes_mask & ATTR_DEBUG:
        raise SigningError("a product enclave (-N) must not mask out the debug "
                           "attribute: it would allow debug launches")


def check_metadata_rewrite(image_path, metadata):
    """Refuse to change metadata that an earlier signing wrote into an image.

    A freshly built image has a zero record; one signed before holds that
    signing's values, and its SIGSTRUCT matches only them. Returns the
    image's current record; raises SigningError naming the old and new values
    when they differ.
    """
    current = image_metadata(image_path)
    if any(current) and current != metadata:
        raise SigningError(
            f"{image_path} already carries metadata from an earlier signing "
            f"({describe_metadata(current)}); signing it for "
            f"{describe_metadata(metadata)} rewrites it, and every SIGSTRUCT made "
            "for the old values stops matching the image: sign a copy of the "
            "image, or give --rewrite-metadata")
    return current


def describe_metadata(metadata):
    """The metadata record in the words of the options that set it."""
    protection = "on" if metadata.null_dereference_protection else "off"
    return (f"mmap size {metadata.max_mmap_size:#x}, NULL-dereference protection "
            f"{protection}, mmap_min_addr {metadata.mmap_min_addr:#x}")


def image_metadata(image_path):
    """The metadata record an image holds now; raises ImageError."""
    return METADATA.unpack(read_pages(image_path)[-PAGE_SIZE:][:METADATA.size])


def write_metadata(image_path, metadata):
    """Write the metadata record at the start of the image's last page, in place."""
    last_page = len(read_pages(image_path)) - PAGE_SIZE
    with open(image_path, "r+b") as f:
        f.seek(last_page)
        f.write(METADATA.pack(**metadata._asdict()))


def sign(key, image_path, output_path, *, mmap_size=0, attributes=None,
         attributes_mask=None, xfrm=None, xfrm_mask=None,
         product=False, debug_enclave=False, null_dereference_protection=False,
         mmap_min_addr=None, tbs_path=None, date=None):
    """Sign an image: write its metadata, then its SIGSTRUCT to ``output_path``.

    ``key`` is an RSA private key or the path of a PEM file. Attributes and
    XFRM default to 64-bit mode and x87|SSE, each under an all-ones mask; a
    value given without its mask implies the mask and the reverse.
    ``mmap_min_addr`` defaults to the host's ``vm.mmap_min_addr``. Returns
    the SIGSTRUCT bytes. Raises SigningError for refused options or keys and
    ImageError for an unusable image.
    """
    if not isinstance(key, rsa.RSAPrivateKey):
        key = load_key(key)
    implied_mask = attributes_mask is None
    attributes, attributes_mask = implied_pair(attributes, attributes_mask,
                                               ATTR_MODE64BIT, ALL_ONES)
    xfrm, xfrm_mask = implied_pair(xfrm, xfrm_mask, XFRM_LEGACY, ALL_ONES)
    if debug_enclave:
        attributes |= ATTR_DEBUG
        if implied_mask:
            attributes_mask |= ATTR_DEBUG
    check_options(attributes, attributes_mask, xfrm, product)
    if mmap_min_addr is None:
        mmap_min_addr = host_mmap_min_addr()
    if mmap_min_addr % PAGE_SIZE:
        raise SigningError(f"mmap_min_addr {mmap_min_addr:#x} is not page aligned")
    miscselect = 0

    # Check the geometry before touching the image, so a refused size leaves
    # it as it was.
    metadata = METADATA.record(
        max_mmap_size=mmap_size, mmap_min_addr=mmap_min_addr,
        null_dereference_protection=int(null_dereference_protection))
    geometry = Geometry.compute(len(read_pages(image_path)), metadata, xfrm,
                                miscselect)
    if geometry.enclave_size > MAX_ENCLAVE_SIZE:
        raise SigningError(f"the enclave would be {geometry.enclave_size:#x} bytes "
                           f"(mmap size {geometry.mmap_size:#x} plus the image "
                           f"offset {geometry.encl_offset:#x}, rounded up to a power "
                           f"of two); at most {MAX_ENCLAVE_SIZE:#x} (64 GiB)")
    write_metadata(image_path, metadata)
    data = read_pages(image_path)
    geometry = Geometry.of_image(data, xfrm, miscselect)
    mrenclave = measure(data, geometry)

    header = bytearray(SIGSTRUCT_HEADER)
    if not product:
        marker = int.from_bytes(header[DEBUG_MARKER_OFFSET:], "little") | DEBUG_MARKER
        header[DEBUG_MARKER_OFFSET:] = marker.to_bytes(4, "little")
    modulus = key.public_key().public_numbers().n
    body = bytearray(SIGSTRUCT.pack(
        header=bytes(header), vendor=0,
        date=bcd_date(date or datetime.date.today()), header2=SIGSTRUCT_HEADER2,
        modulus=modulus.to_bytes(MODULUS_BYTES, "little"), exponent=EXPONENT,
        miscselect=miscselect, miscmask=0xFFFFFFFF, attributes=attributes,
        xfrm=xfrm, attributes_mask=attributes_mask, xfrm_mask=xfrm_mask,
        enclave_hash=mrenclave))
    tbs = signed_bytes(body)
    signature = int.from_bytes(key.sign(tbs, padding.PKCS1v15(), hashes.SHA256()),
                               "big")
    # q1 and q2 let the CPU check the signature without a division (SDM 34.14).
    q1 = signature ** 2 // modulus
    q2 = (signature ** 3 - q1 * signature * modulus) // modulus
    for field, value in (("signature", signature), ("q1", q1), ("q2", q2)):
        SIGSTRUCT.set(body, field, value.to_bytes(MODULUS_BYTES, "little"))

    pathlib.Path(output_path).write_bytes(body)
    if tbs_path is not None:
        pathlib.Path(tbs_path).write_bytes(tbs)
    return bytes(body)


def _hex(text):
    """A u64 in hex, as the SIGSTRUCT and metadata fields hold."""
    try:
        value = int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hex number") from None
    if not 0 <= value <= ALL_ONES:
        raise argparse.ArgumentTypeError(f"{text} is out of range: a 64-bit value, "
                                         f"0 to {ALL_ONES:#x}")
    return value


def _mmap_size(text):
    """An mmap size in bytes (decimal, or 0x hex), at most MAX_ENCLAVE_SIZE.

    It need not be a power of two: the enclave size is the power of two above
    it. The cap is the largest enclave this signer and the loaders build
    (skeleton.image.MAX_ENCLAVE_SIZE); every page up to it is measured.
    """
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= MAX_ENCLAVE_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text} is out of range: 0 to {MAX_ENCLAVE_SIZE} ({MAX_ENCLAVE_SIZE:#x}, "
            "64 GiB, the largest enclave size)")
    return value


def _parser():
    p = argparse.ArgumentParser(
        prog="sgxsign",
        description="Sign a skeleton enclave image. IMAGE is modified in place: "
                    "the metadata record (mmap size, NULL-dereference protection, "
                    "mmap_min_addr) is written into its last page before it is "
                    "measured, so a SIGSTRUCT made for other values no longer "
                    "matches it. sgxsign refuses to change metadata that an "
                    "earlier signing wrote unless --rewrite-metadata is given; to "
                    "sign one image for several sizes, sign a copy for each.",
        usage="sgxsign [options] KEY IMAGE OUTPUT [SIGSTRUCT_TBS_OUT]\n"
              "       sgxsign --genkey KEYFILE")
    p.add_argument("--genkey", metavar="KEYFILE",
                   help="write a new RSA-3072 key with exponent 3 and exit")
    p.add_argument("-N", "--no-debugger", action="store_true",
                   help="sign a product enclave (no debug marker, no debug attribute)")
    p.add_argument("-D", "--debug-enclave", action="store_true",
                   help="set the debug attribute")
    p.add_argument("-s", "--mmap-size", type=_mmap_size, default=0,
                   metavar="BYTES", help="enclave mmap size (max_mmap_size), at most "
                                         "64 GiB; the enclave size is the power of "
                                         "two at or above it")
    p.add_argument("-a", "--attrs", type=_hex, metavar="HEX",
                   help="attributes (default 64-bit mode)")
    p.add_argument("-A", "--attrs-mask", type=_hex, metavar="HEX",
                   help="attributes mask (default: the attributes when given, "
                        "else all ones)")
    p.add_argument("-x", "--xfrm", type=_hex, metavar="HEX",
                   help="XFRM (default x87|SSE, 0x3)")
    p.add_argument("-X", "--xfrm-mask", type=_hex, metavar="HEX",
                   help="XFRM mask (default: the XFRM when given, else all ones)")
    p.add_argument("-n", "--null_dereference_protection", action="store_true",
                   help="load the image above mmap_min_addr in an enclave at 0")
    p.add_argument("-m", "--mmap_min_addr", type=_hex, metavar="HEX",
                   help="the vm.mmap_min_addr the enclave will run with; with -n "
                        "the image offset, 16 MiB when 0 (default: this host's)")
    p.add_argument("--rewrite-metadata", action="store_true",
                   help="allow changing the metadata an earlier signing wrote into "
                        "IMAGE (SIGSTRUCTs made for the old values stop matching)")
    p.add_argument("files", nargs="*", metavar="KEY IMAGE OUTPUT [SIGSTRUCT_TBS_OUT]")
    return p


def main(argv=None):
    """Entry point of the ``sgxsign`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.genkey is not None and args.files:
        parser.error("--genkey takes no other files")
    if args.genkey is None and len(args.files) not in (3, 4):
        parser.error("expected KEY IMAGE OUTPUT [SIGSTRUCT_TBS_OUT]")
    try:
        if args.genkey is not None:
            generate_key(args.genkey)
            return 0
        key, image, output, *tbs = args.files
        old = _metadata_change(image, args)
        sign(key, image, output, mmap_size=args.mmap_size, attributes=args.attrs,
             attributes_mask=args.attrs_mask, xfrm=args.xfrm,
             xfrm_mask=args.xfrm_mask, product=args.no_debugger,
             debug_enclave=args.debug_enclave,
             null_dereference_protection=args.null_dereference_protection,
             mmap_min_addr=args.mmap_min_addr, tbs_path=tbs[0] if tbs else None)
        if old is not None:
            print(f"sgxsign: warning: rewrote the metadata of {image} (it was "
                  f"{describe_metadata(old)}): SIGSTRUCTs made for those values no "
                  "longer match it", file=sys.stderr)
    except (SigningError, ImageError) as e:
        print(f"sgxsign: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sgxsign: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


def _metadata_change(image, args):
    """The metadata that signing will replace, or None when it stays the same.

    Raises SigningError for a change without --rewrite-metadata.
    """
    mmap_min_addr = args.mmap_min_addr
    if mmap_min_addr is None:
        mmap_min_addr = host_mmap_min_addr()
    metadata = METADATA.record(
        max_mmap_size=args.mmap_size, mmap_min_addr=mmap_min_addr,
        null_dereference_protection=int(args.null_dereference_protection))
    if not args.rewrite_metadata:
        check_metadata_rewrite(image, metadata)
        return None
    current = image_metadata(image)
    return current if any(current) and current != metadata else None


if __name__ == "__main__":
    sys.exit(main())
