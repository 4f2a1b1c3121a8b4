"""RSA signature checks and AES-CMAC from OpenSSL 3's libcrypto, through cffi.

The sim backend plays the CPU: EINIT checks a SIGSTRUCT's RSA-3072
signature, EREPORT MACs a REPORT with AES-128-CMAC. Both come from the
libcrypto that Python's hashlib already loads, called through the
declarations of ``skeleton.ffi_build``, rather than from the cryptography
package: the PAL imports the launch path in every container it starts, and
cryptography's import alone cost about 15-25 ms of a 40 ms budget for a cold
launch (issue 7). Nothing is parsed or compiled at import; ``load`` opens
the library and fetches both algorithms, so that after it no file needs to
be visible (the PAL calls it before rune pivots into the container's root).
"""

import functools

from skeleton.errors import SkeletonError
from skeleton.native import ffi

# The soname of OpenSSL 3, whose EVP_MAC and EVP_PKEY_fromdata this uses.
LIBCRYPTO = "libcrypto.so.3"
# openssl/core.h and evp.h.
_PARAM_UNSIGNED_INTEGER = 2
_PARAM_UTF8_STRING = 4
_PARAM_UNMODIFIED = 2 ** 64 - 1
_PKEY_PUBLIC_KEY = 0x86  # EVP_PKEY_KEY_PARAMETERS | OSSL_KEYMGMT_SELECT_PUBLIC_KEY
CMAC_SIZE = 16
# Parameter names, allocated once: OSSL_PARAM holds pointers to them.
_N, _E, _CIPHER = (ffi.new("char[]", name) for name in (b"n", b"e", b"cipher"))


class OpenSSLError(SkeletonError):
    """libcrypto is missing here, or one of its calls failed."""


@functools.cache
def load():
    """Open libcrypto and fetch AES-CMAC; returns ``(lib, cmac)``.

    Raises OpenSSLError when OpenSSL 3's libcrypto cannot be opened or lacks
    CMAC. Cached: later calls cost nothing and read no file.
    """
    try:
        lib = ffi.dlopen(LIBCRYPTO)
    except OSError as e:
        raise OpenSSLError(f"cannot open {LIBCRYPTO} (OpenSSL 3), which the sim "
                           f"backend's EINIT and reports need: {e}") from None
    cmac = lib.EVP_MAC_fetch(ffi.NULL, b"CMAC", ffi.NULL)
    if cmac == ffi.NULL:
        raise OpenSSLError(f"{LIBCRYPTO} has no CMAC: {_last_error(lib)}")
    return lib, cmac


def rsa_verify_sha256(modulus, exponent, signature, message):
    """Whether ``signature`` is an RSASSA-PKCS1-v1_5 SHA-256 signature of
    ``message`` under the public key (``modulus``, ``exponent``).

    ``modulus`` is an int; ``signature`` is big-endian bytes, as PKCS #1
    writes it. Returns False for a signature that does not verify, including
    one of the wrong length or not below the modulus. Raises OpenSSLError
    when libcrypto refuses the key itself.
    """
    lib, _ = load()
    length = (modulus.bit_length() + 7) // 8
    # OSSL_PARAM integers are in the host's byte order (x86: little-endian).
    n = ffi.from_buffer(modulus.to_bytes(length, "little"))
    e = ffi.from_buffer(exponent.to_bytes(8, "little"))
    params = ffi.new("OSSL_PARAM[3]", [
        (_N, _PARAM_UNSIGNED_INTEGER, n, len(n), _PARAM_UNMODIFIED),
        (_E, _PARAM_UNSIGNED_INTEGER, e, len(e), _PARAM_UNMODIFIED),
        (ffi.NULL, 0, ffi.NULL, 0, 0)])
    pkey = ffi.new("EVP_PKEY **")
    ctx = lib.EVP_PKEY_CTX_new_from_name(ffi.NULL, b"RSA", ffi.NULL)
    try:
        if (ctx == ffi.NULL or lib.EVP_PKEY_fromdata_init(ctx) != 1
                or lib.EVP_PKEY_fromdata(ctx, pkey, _PKEY_PUBLIC_KEY, params) != 1):
            raise OpenSSLError(f"libcrypto refused the RSA public key: "
                               f"{_last_error(lib)}")
    finally:
        lib.EVP_PKEY_CTX_free(ctx)
    md = lib.EVP_MD_CTX_new()
    try:
        if md == ffi.NULL or lib.EVP_DigestVerifyInit_ex(
                md, ffi.NULL, b"SHA256", ffi.NULL, ffi.NULL, pkey[0], ffi.NULL) != 1:
            raise OpenSSLError(f"cannot start an RSA verification: "
                               f"{_last_error(lib)}")
        ok = lib.EVP_DigestVerify(md, signature, len(signature),
                                  message, len(message)) == 1
        # A refused signature leaves its reason queued; it is an answer here.
        lib.ERR_clear_error()
        return ok
    finally:
        lib.EVP_MD_CTX_free(md)
        lib.EVP_PKEY_free(pkey[0])


def aes_cmac(key, data):
    """The AES-CMAC (RFC 4493) of ``data`` under a 16, 24 or 32-byte ``key``.

    Raises OpenSSLError for a key of another length.
    """
    if len(key) not in (16, 24, 32):
        raise OpenSSLError(f"AES-CMAC key must be 16, 24 or 32 bytes, got {len(key)}")
    lib, cmac = load()
    cipher = b"AES-%d-CBC" % (len(key) * 8)
    params = ffi.new("OSSL_PARAM[2]", [
        (_CIPHER, _PARAM_UTF8_STRING, ffi.from_buffer(cipher), len(cipher),
         _PARAM_UNMODIFIED),
        (ffi.NULL, 0, ffi.NULL, 0, 0)])
    out = ffi.new("unsigned char[]", CMAC_SIZE)
    size = ffi.new("size_t *")
    ctx = lib.EVP_MAC_CTX_new(cmac)
    try:
        if (ctx == ffi.NULL
                or lib.EVP_MAC_init(ctx, key, len(key), params) != 1
                or lib.EVP_MAC_update(ctx, data, len(data)) != 1
                or lib.EVP_MAC_final(ctx, out, size, CMAC_SIZE) != 1):
            raise OpenSSLError(f"AES-CMAC failed: {_last_error(lib)}")
    finally:
        lib.EVP_MAC_CTX_free(ctx)
    return bytes(out[0:size[0]])


def _last_error(lib):
    """The reason libcrypto queued last, as text; the queue is emptied."""
    code = lib.ERR_get_error()
    lib.ERR_clear_error()
    if not code:
        return "no reason given"
    text = ffi.new("char[]", 256)
    lib.ERR_error_string_n(code, text, len(text))
    return ffi.string(text).decode(errors="replace")
