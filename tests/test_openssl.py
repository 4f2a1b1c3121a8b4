"""skeleton.openssl: RSA checks and AES-CMAC through libcrypto, against
RFC 4493's vectors and the cryptography package."""

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import algorithms

from skeleton import openssl

RFC4493_KEY = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
RFC4493_MESSAGE = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710")


@pytest.fixture(scope="module")
def key():
    return rsa.generate_private_key(public_exponent=3, key_size=3072)


@pytest.mark.parametrize("length, mac", [
    (0, "bb1d6929e95937287fa37d129b756746"),
    (16, "070a16b46b4d4144f79bdd9dd04a287c"),
    (40, "dfa66747de9ae63030ca32611497c827"),
    (64, "51f0bebf7e3b9d92fc49741779363cfe"),
])
def test_cmac_matches_rfc4493(length, mac):
    assert openssl.aes_cmac(RFC4493_KEY, RFC4493_MESSAGE[:length]).hex() == mac


@pytest.mark.parametrize("key_size", [16, 24, 32])
def test_cmac_matches_cryptography(key_size):
    key, data = os.urandom(key_size), os.urandom(1000)
    theirs = cmac.CMAC(algorithms.AES(key))
    theirs.update(data)
    assert openssl.aes_cmac(key, data) == theirs.finalize()


def test_cmac_refuses_a_key_of_the_wrong_length():
    with pytest.raises(openssl.OpenSSLError, match="got 15"):
        openssl.aes_cmac(b"k" * 15, b"data")


def test_rsa_accepts_a_signature_of_the_message(key):
    signature = key.sign(b"message", padding.PKCS1v15(), hashes.SHA256())
    n = key.public_key().public_numbers().n
    assert openssl.rsa_verify_sha256(n, 3, signature, b"message")


@pytest.mark.parametrize("tamper", ["message", "signature", "short", "modulus",
                                    "exponent", "digest"])
def test_rsa_refuses_what_was_not_signed(key, tamper):
    message = b"message"
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    n, e = key.public_key().public_numbers().n, 3
    if tamper == "message":
        message += b"!"
    elif tamper == "signature":
        signature = signature[:-1] + bytes([signature[-1] ^ 1])
    elif tamper == "short":
        signature = signature[1:]
    elif tamper == "modulus":
        n = rsa.generate_private_key(3, 3072).public_key().public_numbers().n
    elif tamper == "exponent":
        e = 65537
    elif tamper == "digest":
        signature = key.sign(message, padding.PKCS1v15(), hashes.SHA384())
    assert not openssl.rsa_verify_sha256(n, e, signature, message)


def test_rsa_refuses_a_signature_above_the_modulus(key):
    n = key.public_key().public_numbers().n
    assert not openssl.rsa_verify_sha256(n, 3, (n + 1).to_bytes(384, "big"), b"m")


def test_a_refusal_leaves_no_error_queued(key):
    """A later failure must report its own reason, not a stale one."""
    n = key.public_key().public_numbers().n
    assert not openssl.rsa_verify_sha256(n, 3, b"\x01" * 384, b"m")
    lib, _ = openssl.load()
    assert lib.ERR_get_error() == 0


def test_the_launch_path_does_not_import_cryptography():
    """The PAL imports the launch path in every container; cryptography's
    import alone would cost a third of the cold-launch budget."""
    code = ("import sys; from skeleton.capi import entry; entry._preload(); "
            "print(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"
