"""sgxsign: the SIGSTRUCT it writes, the metadata it stores, what it refuses."""

import datetime
import hashlib
import os
import pathlib
import shutil
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from skeleton import build_image, sgxsign
from skeleton.backends import sim
from skeleton.errors import SigningError
from skeleton.image import load_image

PAGE = 4096
ALL = (1 << 64) - 1


@pytest.fixture(scope="module")
def key_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "key.pem"
    assert sgxsign.main(["--genkey", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("build") / "encl.bin"
    build_image.build(path)
    return path


@pytest.fixture
def image(built, tmp_path):
    path = tmp_path / "encl.bin"
    shutil.copy(built, path)
    return path


def _field(sigstruct, offset, size):
    return int.from_bytes(sigstruct[offset:offset + size], "little")


def test_genkey_writes_rsa_3072_with_exponent_3(key_path):
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)

    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 3072
    assert key.public_key().public_numbers().e == 3
    assert key_path.stat().st_mode & 0o077 == 0


def test_signature_verifies_over_the_signed_ranges(key_path, image, tmp_path):
    out, tbs = tmp_path / "encl.ss", tmp_path / "tbs"

    assert sgxsign.main([str(key_path), str(image), str(out), str(tbs)]) == 0

    sig = out.read_bytes()
    assert len(sig) == 1808 and sig[512:516] == struct.pack("<I", 3)
    assert tbs.read_bytes() == sig[:128] + sig[900:1028]
    n = _field(sig, 128, 384)
    public = rsa.RSAPublicNumbers(3, n).public_key()
    public.verify(sig[516:900][::-1], sig[:128] + sig[900:1028], padding.PKCS1v15(),
                  hashes.SHA256())


def test_q1_and_q2_satisfy_their_equations(key_path, image, tmp_path):
    sig = sgxsign.sign(key_path, image, tmp_path / "encl.ss")

    n, s = _field(sig, 128, 384), _field(sig, 516, 384)
    q1, q2 = _field(sig, 1040, 384), _field(sig, 1424, 384)
    assert q1 == s * s // n
    assert q2 == (s ** 3 - q1 * s * n) // n


def test_date_is_bcd_and_vendor_is_zero(key_path, image, tmp_path):
    sig = sgxsign.sign(key_path, image, tmp_path / "encl.ss",
                       date=datetime.date(2024, 5, 17))
    assert _field(sig, 20, 4) == 0x20240517
    assert _field(sig, 16, 4) == 0


def test_debug_marker_is_set_unless_product(key_path, image, tmp_path):
    debug = sgxsign.sign(key_path, image, tmp_path / "a.ss")
    product = sgxsign.sign(key_path, image, tmp_path / "b.ss", product=True)

    assert _field(debug, 12, 4) >> 31 == 1
    assert _field(product, 12, 4) >> 31 == 0
    assert debug[24:40] == bytes.fromhex("01010000600000006000000001000000")


def test_debug_enclave_sets_the_debug_attribute(key_path, image, tmp_path):
    sig = sgxsign.sign(key_path, image, tmp_path / "encl.ss", debug_enclave=True)
    assert _field(sig, 928, 8) == 0x6
    assert _field(sig, 936, 8) == 0x3


def test_metadata_is_written_into_the_image_before_measuring(key_path, image,
                                                              tmp_path):
    size = image.stat().st_size
    sgxsign.main(["-s", str(8 << 20), "-n", "-m", "20000", str(key_path),
                  str(image), str(tmp_path / "encl.ss")])

    data = image.read_bytes()
    last_page = size - size % PAGE
    assert len(data) == size
    assert struct.unpack_from("<QBQ", data, last_page) == (8 << 20, 1, 0x20000)


def test_mrenclave_depends_on_the_mmap_size(key_path, image, tmp_path):
    small = sgxsign.sign(key_path, image, tmp_path / "a.ss", mmap_size=1 << 20)
    large = sgxsign.sign(key_path, image, tmp_path / "b.ss", mmap_size=2 << 20)
    assert small[960:992] != large[960:992]


@pytest.mark.parametrize("options, message", [
    (["-N", "-D"], "a product enclave (-N) must not have the debug attribute"),
    (["-a", "3"], "attributes 0x3 lack 64-bit mode (bit 2)"),
    (["-x", "1"], "xfrm 0x1 lacks the legacy x87|SSE state (0x3)"),
])
def test_refusals_print_one_line(key_path, image, tmp_path, capsys, options, message):
    code = sgxsign.main([*options, str(key_path), str(image),
                         str(tmp_path / "encl.ss")])

    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith(f"sgxsign: {message}") and err.count("\n") == 1
    assert not (tmp_path / "encl.ss").exists()


def test_a_key_with_another_exponent_is_refused(image, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    path = tmp_path / "k.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    with pytest.raises(SigningError, match="exponent 3, got RSA-3072 with exponent"):
        sgxsign.sign(path, image, tmp_path / "encl.ss")


def test_a_missing_image_is_one_line(key_path, tmp_path, capsys):
    code = sgxsign.main([str(key_path), str(tmp_path / "nope"), str(tmp_path / "o")])
    assert code == 1
    assert capsys.readouterr().err == f"sgxsign: {tmp_path / 'nope'}: no such file\n"


def test_a_refused_mmap_size_leaves_the_image_untouched(key_path, image, tmp_path,
                                                        capsys):
    before = image.read_bytes()

    code = sgxsign.main(["-s", "4096", str(key_path), str(image),
                         str(tmp_path / "encl.ss")])

    assert code == 1
    assert "max_mmap_size 4096 is below" in capsys.readouterr().err
    assert image.read_bytes() == before


def _independent_mrenclave(image_bytes, xfrm_pages=1):
    """MRENCLAVE from the signed image alone, following DESIGN §5 step by step."""
    data = image_bytes + bytes(-len(image_bytes) % PAGE)
    meta_at = len(data) - PAGE
    max_mmap, protect, min_addr = struct.unpack_from("<QBQ", data, meta_at)
    offset = (min_addr or 16 << 20) if protect else 0
    mmap_size = max_mmap or len(data) + xfrm_pages * PAGE
    mmap_size = -(-mmap_size // PAGE) * PAGE
    size = PAGE
    while size < mmap_size + offset:
        size *= 2
    h = hashlib.sha256(b"ECREATE\0" + struct.pack("<IQ", xfrm_pages, size)
                       + bytes(44))

    def add(at, flags, page):
        h.update(b"EADD\0\0\0\0" + struct.pack("<QQ", at, flags) + bytes(40))
        for chunk in range(0, PAGE, 256):
            h.update(b"EEXTEND\0" + struct.pack("<Q", at + chunk) + bytes(48)
                     + page[chunk:chunk + 256])

    tcs = bytearray(data[:PAGE])
    struct.pack_into("<Q", tcs, 16, offset + len(data))
    struct.pack_into("<Q", tcs, 32, struct.unpack_from("<Q", tcs, 32)[0] + offset)
    add(offset, 0x100, bytes(tcs))
    for at in range(PAGE, mmap_size, PAGE):
        add(offset + at, 0x207, data[at:at + PAGE].ljust(PAGE, b"\0"))
    return h.digest()


@pytest.mark.parametrize("options", [
    [], ["-s", str(1 << 20)], ["-n"], ["-n", "-m", "0"],
    ["-s", str(2 << 20), "-n", "-m", "10000"]])
def test_mrenclave_matches_an_independent_calculation(key_path, image, tmp_path,
                                                      options):
    out = tmp_path / "encl.ss"

    assert sgxsign.main([*options, str(key_path), str(image), str(out)]) == 0

    assert out.read_bytes()[960:992] == _independent_mrenclave(image.read_bytes())


def test_mmap_min_addr_defaults_to_the_hosts(key_path, image, tmp_path):
    host = int(pathlib.Path("/proc/sys/vm/mmap_min_addr").read_text())
    sgxsign.main([str(key_path), str(image), str(tmp_path / "encl.ss")])

    data = image.read_bytes()
    assert struct.unpack_from("<Q", data, len(data) - len(data) % PAGE + 9)[0] \
        == host == 4096


@pytest.mark.parametrize("options, fields", [
    (["-a", "6"], (0x6, 0x3, 0x6, ALL)),
    (["-A", "6"], (0x6, 0x3, 0x6, ALL)),
    (["-a", "4", "-A", "fffffffffffffffd"], (0x4, 0x3, ~2 & ALL, ALL)),
    (["-x", "7"], (0x4, 0x7, ALL, 0x7)),
    (["-X", "7"], (0x4, 0x7, ALL, 0x7)),
    (["-D"], (0x6, 0x3, ALL, ALL)),
    (["-D", "-a", "4"], (0x6, 0x3, 0x6, ALL)),
])
def test_a_value_implies_its_mask_and_the_reverse(key_path, image, tmp_path,
                                                  options, fields):
    out = tmp_path / "encl.ss"
    assert sgxsign.main([*options, str(key_path), str(image), str(out)]) == 0
    sig = out.read_bytes()
    assert tuple(_field(sig, at, 8) for at in (928, 936, 944, 952)) == fields


@pytest.mark.parametrize("options, message", [
    (["-N", "-a", "4"], "a product enclave (-N) must not mask out the debug "
                        "attribute: it would allow debug launches"),
    (["-N", "-A", "6"], "a product enclave (-N) must not have the debug attribute"),
    (["-a", "4", "-A", "2"], "attributes mask 0x2 does not enforce 64-bit mode"),
    (["-X", "1"], "xfrm 0x1 lacks the legacy x87|SSE state"),
    (["-n", "-m", "1234"], "mmap_min_addr 0x1234 is not page aligned"),
])
def test_each_refusal_has_its_own_message(key_path, image, tmp_path, capsys,
                                          options, message):
    code = sgxsign.main([*options, str(key_path), str(image),
                         str(tmp_path / "encl.ss")])

    assert code == 1
    assert capsys.readouterr().err.startswith(f"sgxsign: {message}")
    assert not (tmp_path / "encl.ss").exists()


def test_a_bad_hex_value_is_a_usage_error(key_path, image, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sgxsign.main(["-a", "zz", str(key_path), str(image), str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "'zz' is not a hex number" in capsys.readouterr().err


def test_product_signature_launches_in_sim(key_path, image, tmp_path):
    """-N with the default all-ones mask launches, without debug."""
    sgxsign.sign(key_path, image, tmp_path / "encl.ss", product=True,
                 mmap_size=1 << 20)
    with sim.build(load_image(tmp_path)) as enclave:
        assert enclave.ecall(0) == "Hello Inclavare Containers!"


def _sign(key_path, image, output, *options):
    return sgxsign.main([*options, str(key_path), str(image), str(output)])


def test_help_says_the_image_is_modified_in_place(capsys):
    with pytest.raises(SystemExit):
        sgxsign.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "IMAGE is modified in place" in out
    assert "--rewrite-metadata" in out


def test_signing_for_other_values_is_refused_and_the_old_sigstruct_still_works(
        key_path, image, tmp_path, capsys):
    assert _sign(key_path, image, tmp_path / "encl.ss", "-s", str(1 << 20)) == 0
    before = image.read_bytes()

    code = _sign(key_path, image, tmp_path / "other.ss", "-s", str(2 << 20))

    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert f"{image} already carries metadata from an earlier signing (mmap size " \
           "0x100000, NULL-dereference protection off, mmap_min_addr 0x1000); " \
           "signing it for mmap size 0x200000," in err
    assert "give --rewrite-metadata" in err
    assert image.read_bytes() == before and not (tmp_path / "other.ss").exists()
    with sim.build(load_image(tmp_path)) as enclave:
        assert enclave.ecall(0) == "Hello Inclavare Containers!"


def test_signing_again_for_the_same_values_needs_no_flag(key_path, image, tmp_path,
                                                         capsys):
    assert _sign(key_path, image, tmp_path / "a.ss", "-s", str(1 << 20)) == 0
    assert _sign(key_path, image, tmp_path / "b.ss", "-s", str(1 << 20)) == 0
    assert capsys.readouterr().err == ""


def test_rewrite_metadata_rewrites_and_warns_with_the_old_values(
        key_path, image, tmp_path, capsys):
    assert _sign(key_path, image, tmp_path / "a.ss", "-s", str(1 << 20)) == 0

    code = _sign(key_path, image, tmp_path / "encl.ss", "--rewrite-metadata",
                 "-s", str(2 << 20))

    err = capsys.readouterr().err
    assert code == 0
    assert err == (f"sgxsign: warning: rewrote the metadata of {image} (it was "
                   "mmap size 0x100000, NULL-dereference protection off, "
                   "mmap_min_addr 0x1000): SIGSTRUCTs made for those values no "
                   "longer match it\n")
    assert load_image(tmp_path).metadata.max_mmap_size == 2 << 20


@pytest.mark.parametrize("which", ["key", "image"])
def test_a_device_as_key_or_image_is_one_prompt_line(key_path, image, tmp_path,
                                                     capsys, which):
    files = {"key": key_path, "image": image, which: "/dev/zero"}
    assert _sign(files["key"], files["image"], tmp_path / "o.ss") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/dev/zero: not a regular file" in err


def test_a_fifo_as_image_is_refused_without_blocking(key_path, tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    assert _sign(key_path, tmp_path / "fifo", tmp_path / "o.ss") == 1
    assert "fifo: not a regular file" in capsys.readouterr().err


def test_genkey_refuses_an_existing_file_and_keeps_it(tmp_path, capsys):
    path = tmp_path / "key.pem"
    path.write_text("keep me")
    path.chmod(0o644)

    assert sgxsign.main(["--genkey", str(path)]) == 1

    assert capsys.readouterr().err == (f"sgxsign: {path}: already exists; --genkey "
                                       "writes only a new file (remove it or "
                                       "choose another path)\n")
    assert path.read_text() == "keep me"


def test_genkey_does_not_follow_a_symbolic_link(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "key.pem").symlink_to(target)
    assert sgxsign.main(["--genkey", str(tmp_path / "key.pem")]) == 1
    assert not target.exists()


def test_genkey_writes_mode_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        assert sgxsign.main(["--genkey", str(tmp_path / "key.pem")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("options, message", [
    (["-s", "99999999999999999999"], "argument -s/--mmap-size: 99999999999999999999 "
                                     "is out of range: 0 to 68719476736"),
    (["-s", str(1 << 40)], "argument -s/--mmap-size: 1099511627776 is out of range"),
    (["-s", "-1"], "argument -s/--mmap-size: -1 is out of range"),
    (["-x", "0xffffffffffffffffff"], "argument -x/--xfrm: 0xffffffffffffffffff is "
                                     "out of range: a 64-bit value"),
    (["-a", "0x1ffffffffffffffff"], "argument -a/--attrs: 0x1ffffffffffffffff is "
                                    "out of range"),
    (["-m", "1" + "0" * 17], "argument -m/--mmap_min_addr: "),
])
def test_an_out_of_range_value_is_a_usage_error(key_path, image, tmp_path, capsys,
                                                options, message):
    with pytest.raises(SystemExit) as exit_info:
        _sign(key_path, image, tmp_path / "o.ss", *options)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_enclave_over_64_gib_is_refused_before_measuring(key_path, image,
                                                            tmp_path, capsys):
    """The largest mmap size with -n's 16 MiB offset would need 128 GiB."""
    before = image.read_bytes()
    code = _sign(key_path, image, tmp_path / "o.ss", "-s", str(64 << 30), "-n",
                 "-m", "0")
    assert code == 1
    assert "the enclave would be 0x2000000000 bytes" in capsys.readouterr().err
    assert image.read_bytes() == before
