"""Generate ``skeleton/_ffi.py``: the skeleton's C declarations, parsed ahead of time.

Usage: ``python -m skeleton.ffi_build [--out skeleton/_ffi.py]`` (``make``
runs it). The PAL libraries start Python in every new container, and parsing
these declarations at import costs pycparser's import plus a parse per
module. cffi's out-of-line ABI mode parses them once, here, into a Python
module of precomputed type data that ``_cffi_backend`` loads without
pycparser; ``skeleton.native`` imports it. Nothing is compiled: calls still
go through libffi to the functions of the process (libc, the vDSO) and
to libcrypto.
"""

import os
import sys

MODULE = "skeleton._ffi"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.realpath(__file__)), "_ffi.py")

# libc for mapping enclaves (skeleton.enclave) and for the in-tree driver, whose
# structures follow the kernel's uapi asm/sgx.h (skeleton.backends.sgx, checked
# against the header by tests/test_sgx_backend.py); OpenSSL 3's libcrypto for
# the sim backend's EINIT signature check and report MACs (skeleton.openssl;
# declarations as in openssl/core.h, evp.h and err.h).
CDEF = """
void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset);
int munmap(void *addr, size_t length);
int ioctl(int fd, unsigned long request, void *arg);
unsigned long getauxval(unsigned long type);

struct sgx_enclave_create { uint64_t src; };
struct sgx_enclave_add_pages {
    uint64_t src; uint64_t offset; uint64_t length; uint64_t secinfo;
    uint64_t flags; uint64_t count;
};
struct sgx_enclave_init { uint64_t sigstruct; };
struct sgx_enclave_run {
    uint64_t tcs; uint32_t function; uint16_t exception_vector;
    uint16_t exception_error_code; uint64_t exception_addr;
    uint64_t user_handler; uint64_t user_data; uint8_t reserved[216];
};

typedef struct ossl_param_st {
    const char *key; unsigned int data_type; void *data; size_t data_size;
    size_t return_size;
} OSSL_PARAM;
typedef struct evp_pkey_st EVP_PKEY;
typedef struct evp_pkey_ctx_st EVP_PKEY_CTX;
typedef struct evp_md_ctx_st EVP_MD_CTX;
typedef struct evp_mac_st EVP_MAC;
typedef struct evp_mac_ctx_st EVP_MAC_CTX;

EVP_PKEY_CTX *EVP_PKEY_CTX_new_from_name(void *libctx, const char *name,
                                         const char *propquery);
void EVP_PKEY_CTX_free(EVP_PKEY_CTX *ctx);
int EVP_PKEY_fromdata_init(EVP_PKEY_CTX *ctx);
int EVP_PKEY_fromdata(EVP_PKEY_CTX *ctx, EVP_PKEY **ppkey, int selection,
                      OSSL_PARAM params[]);
void EVP_PKEY_free(EVP_PKEY *pkey);
EVP_MD_CTX *EVP_MD_CTX_new(void);
void EVP_MD_CTX_free(EVP_MD_CTX *ctx);
int EVP_DigestVerifyInit_ex(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx,
                            const char *mdname, void *libctx, const char *props,
                            EVP_PKEY *pkey, const OSSL_PARAM params[]);
int EVP_DigestVerify(EVP_MD_CTX *ctx, const unsigned char *sig, size_t siglen,
                     const unsigned char *tbs, size_t tbslen);
EVP_MAC *EVP_MAC_fetch(void *libctx, const char *algorithm, const char *properties);
EVP_MAC_CTX *EVP_MAC_CTX_new(EVP_MAC *mac);
void EVP_MAC_CTX_free(EVP_MAC_CTX *ctx);
int EVP_MAC_init(EVP_MAC_CTX *ctx, const unsigned char *key, size_t keylen,
                 const OSSL_PARAM params[]);
int EVP_MAC_update(EVP_MAC_CTX *ctx, const unsigned char *data, size_t datalen);
int EVP_MAC_final(EVP_MAC_CTX *ctx, unsigned char *out, size_t *outl,
                  size_t outsize);
unsigned long ERR_get_error(void);
void ERR_error_string_n(unsigned long e, char *buf, size_t len);
void ERR_clear_error(void);
"""


def build(out=DEFAULT_OUT):
    """Write the generated module to ``out``, replacing it atomically."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, None)
    out = os.fspath(out)
    partial = out + ".partial"
    ffi.emit_python_code(str(partial))
    # The declarations go along, so that a module generated from other ones is
    # refused at import instead of failing later on a missing type.
    with open(partial, "a") as f:
        f.write(f"\nCDEF = {CDEF!r}\n")
    os.replace(partial, out)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="path of the module to write (default: %(default)s)")
    args = parser.parse_args(argv)
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
