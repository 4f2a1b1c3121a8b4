"""The sim backend: a sealed memfd enclave, measured and initialized like hardware."""

import fcntl
import os
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from skeleton import cpu, sgxsign
from skeleton import image as image_module
from skeleton.backends import SGX_DEVICE, get_backend, sim
from skeleton.errors import BackendError, EinitError, SkeletonError
from skeleton.image import load_image
from skeleton.structs import TCS

PAGE = 4096
GREETING = "Hello Inclavare Containers!"


@pytest.fixture(scope="module")
def signed(make_signed_image):
    """A directory with a 1 MiB image and the key that signed it."""
    return make_signed_image(1 << 20)


@pytest.fixture
def copy(signed, tmp_path):
    for name in ("encl.bin", "encl.ss"):
        shutil.copy(signed / name, tmp_path / name)
    return tmp_path


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(raw)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_ecall_0_returns_the_greeting(signed):
    with sim.build(load_image(signed)) as enclave:
        assert enclave.ecall(0) == GREETING


def test_sim_calls_the_body_named_by_the_entry_record(signed):
    """Sim cannot run the stub at OENTRY (its ENCLU needs hardware): it calls the
    C body, whose address comes from the entry record in the mapped image."""
    image = load_image(signed)
    with sim.build(image) as enclave:
        assert enclave.body == image.body
        assert enclave.body_address() == enclave.base + image.body
        assert enclave.body != enclave.oentry


def test_sim_refuses_ecall_1_and_reports_from_python(signed):
    with sim.build(load_image(signed)) as enclave:
        with pytest.raises(SkeletonError, match="reports come from report"):
            enclave.ecall(1)


def test_sim_build_passes_einit_with_sgxsign_measurement(signed):
    """EINIT compares the measured MRENCLAVE with the one sgxsign signed."""
    image = load_image(signed)
    with sim.build(image) as enclave:
        assert enclave.identity == image.identity("sim")
        assert enclave.identity.mrenclave == (signed / "encl.ss").read_bytes()[960:992]


def test_memfd_is_sealed_against_resizing(signed):
    with sim.build(load_image(signed)) as enclave:
        seals = fcntl.fcntl(enclave.fd, fcntl.F_GET_SEALS)
        assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) \
            == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(enclave.fd, PAGE)
        assert os.fstat(enclave.fd).st_size == enclave.identity.size


def test_memfd_holds_the_tcs_as_added(signed):
    image = load_image(signed)
    with sim.build(image) as enclave:
        tcs = os.pread(enclave.fd, PAGE, image.encl_offset)
        assert TCS.get(tcs, "ossa") == len(image.data)
        assert enclave.oentry == TCS.get(image.data, "oentry")


def test_layout_is_tcs_page_then_the_rest(signed):
    image = load_image(signed)
    with sim.build(image) as enclave:
        tcs, rest = enclave.layout
        assert enclave.base % image.enclave_size == 0
        assert (tcs.addr, tcs.size, tcs.execute) == (enclave.base, PAGE, False)
        assert (rest.addr, rest.size, rest.execute) == \
            (enclave.base + PAGE, image.mmap_size - PAGE, True)
        assert all(e.share and e.read and e.write for e in enclave.layout)


def test_einit_refuses_a_tampered_image(copy):
    _patch(copy / "encl.bin", PAGE + 0x25, b"\xcc")  # code, after the entry record
    before = _open_fds()
    with pytest.raises(EinitError, match="MRENCLAVE mismatch"):
        sim.build(load_image(copy))
    assert _open_fds() == before


def test_einit_refuses_a_tampered_sigstruct(copy):
    _patch(copy / "encl.ss", 1026, b"\x01")  # isvsvn, a signed field
    with pytest.raises(EinitError, match="signature does not verify"):
        sim.build(load_image(copy))


def test_einit_refuses_another_keys_modulus(copy):
    other = rsa.generate_private_key(public_exponent=3, key_size=3072)
    _patch(copy / "encl.ss", 128,
           other.public_key().public_numbers().n.to_bytes(384, "little"))
    with pytest.raises(EinitError, match="signature does not verify"):
        sim.build(load_image(copy))


def test_einit_refuses_wrong_q1(copy):
    _patch(copy / "encl.ss", 1040, b"\x00" * 8)
    with pytest.raises(EinitError, match="q1/q2 do not match"):
        sim.build(load_image(copy))


@pytest.mark.parametrize("override, message", [
    ({"attributes": 0x14}, "attributes 0x14 outside the SIGSTRUCT's"),
    ({"xfrm": 0x7}, "XFRM 0x7 outside the SIGSTRUCT's"),
])
def test_einit_refuses_secs_outside_the_masks(signed, override, message):
    with pytest.raises(EinitError, match=message):
        sim.build(load_image(signed), **override)


def test_null_dereference_protection_at_16_mib_when_mmap_min_addr_is_0(signed, copy):
    sgxsign.sign(signed / "key.pem", copy / "encl.bin", copy / "encl.ss",
                 mmap_size=1 << 20, null_dereference_protection=True,
                 mmap_min_addr=0)
    image = load_image(copy)
    with sim.build(image) as enclave:
        assert enclave.base == 0
        assert enclave.layout[0].addr == 16 << 20
        assert enclave.ecall(0) == GREETING


def test_null_dereference_layout_on_this_host(signed, copy):
    """vm.mmap_min_addr is 4096 here: the image loads at 0x1000 in an enclave at 0."""
    assert image_module.host_mmap_min_addr() == 4096
    sgxsign.sign(signed / "key.pem", copy / "encl.bin", copy / "encl.ss",
                 mmap_size=1 << 20, null_dereference_protection=True)
    image = load_image(copy)

    assert image_module.check_host(image) == []
    with sim.build(image) as enclave:
        tcs, rest = enclave.layout
        assert (enclave.base, enclave.identity.size) == (0, 2 << 20)
        assert (tcs.addr, rest.addr) == (0x1000, 0x2000)
        assert rest.addr + rest.size == 0x1000 + (1 << 20)
        assert TCS.get(os.pread(enclave.fd, PAGE, 0x1000), "ossa") == \
            0x1000 + len(image.data)
        assert enclave.ecall(0) == GREETING


def test_einit_accepts_a_debug_launch_of_a_debug_signature(signed, copy):
    sgxsign.sign(signed / "key.pem", copy / "encl.bin", copy / "encl.ss",
                 mmap_size=1 << 20, debug_enclave=True)
    with sim.build(load_image(copy), debug=True) as enclave:
        assert enclave.identity.attributes == 0x6


def test_einit_refuses_a_debug_launch_of_a_product_signature(signed, copy):
    sgxsign.sign(signed / "key.pem", copy / "encl.bin", copy / "encl.ss",
                 mmap_size=1 << 20, product=True)
    image = load_image(copy)
    with pytest.raises(EinitError, match=r"product SIGSTRUCT \(signed with -N\) "
                                         "cannot launch a debug enclave"):
        sim.build(image, debug=True)
    with sim.build(image) as enclave:
        assert enclave.ecall(0) == GREETING


def test_einit_says_why_a_debug_launch_needs_a_signature_made_with_d(signed, copy):
    sgxsign.sign(signed / "key.pem", copy / "encl.bin", copy / "encl.ss",
                 mmap_size=1 << 20)
    image = load_image(copy)
    with pytest.raises(EinitError, match="does not allow a debug launch: it was "
                                         "signed without -D") as e:
        sim.build(image, debug=True)
    assert "sign with -D" in str(e.value)
    with sim.build(image) as enclave:
        assert enclave.ecall(0) == GREETING


def test_ecreate_refuses_a_32_bit_enclave(signed):
    with pytest.raises(EinitError, match="32-bit enclaves are refused: attributes "
                                         "0x0 lack MODE64BIT"):
        sim.build(load_image(signed), attributes=0)


def test_ecreate_refuses_xfrm_bits_the_host_lacks(signed, copy):
    sgxsign.sign(signed / "key.pem", copy / "encl.bin", copy / "encl.ss",
                 mmap_size=1 << 20, xfrm=0x7, xfrm_mask=0x3)
    image = load_image(copy)
    with pytest.raises(EinitError, match="XFRM 0x7 enables state components 0x4 "
                                         "that this host's XCR0 0x3 lacks"):
        sim.build(image, host_xcr0=0x3)
    with sim.build(image, host_xcr0=0x7) as enclave:
        assert enclave.identity.xfrm == 0x7


def test_ecreate_refuses_xfrm_without_legacy_state(signed):
    with pytest.raises(EinitError, match="XFRM 0x1 lacks x87|SSE"):
        sim.build(load_image(signed), xfrm=0x1)


def test_host_xcr0_has_the_legacy_state():
    assert cpu.xcr0() & 0x3 == 0x3


def test_sgx_backend_without_device_is_a_clear_error():
    if os.path.exists(SGX_DEVICE):
        pytest.skip("this host has an SGX device")
    with pytest.raises(BackendError, match="/dev/sgx_enclave, not found"):
        get_backend("sgx")
    assert get_backend("sim") is sim
