"""The sgx backend, as far as it can be checked without SGX hardware.

The ioctl numbers and structure layouts are compared with the kernel's own
uapi header, compiled here with gcc; the requests a build issues are compared
with DESIGN §5 through a recording stand-in for the device.
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess

import pytest

from skeleton import sgxsign
from skeleton.backends import get_backend, sgx
from skeleton.enclave import MAP_ANONYMOUS, MAP_NORESERVE, MAP_PRIVATE, _mmap, release
from skeleton.errors import BackendError, EinitError
from skeleton.image import load_image

PAGE = 4096
HEADER = "/usr/include/x86_64-linux-gnu/asm/sgx.h"

PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <asm/sgx.h>
#define F(s, f) printf("\"" #s "." #f "\": [%zu, %zu],", \
    offsetof(struct s, f), sizeof(((struct s *)0)->f))
int main(void)
{
    printf("{\"create\": %lu, \"add_pages\": %lu, \"init\": %lu, \"measure\": %d,",
           (unsigned long)SGX_IOC_ENCLAVE_CREATE,
           (unsigned long)SGX_IOC_ENCLAVE_ADD_PAGES,
           (unsigned long)SGX_IOC_ENCLAVE_INIT, SGX_PAGE_MEASURE);
    F(sgx_enclave_create, src);
    F(sgx_enclave_add_pages, src); F(sgx_enclave_add_pages, offset);
    F(sgx_enclave_add_pages, length); F(sgx_enclave_add_pages, secinfo);
    F(sgx_enclave_add_pages, flags); F(sgx_enclave_add_pages, count);
    F(sgx_enclave_init, sigstruct);
    F(sgx_enclave_run, tcs); F(sgx_enclave_run, function);
    F(sgx_enclave_run, exception_vector); F(sgx_enclave_run, exception_error_code);
    F(sgx_enclave_run, exception_addr); F(sgx_enclave_run, user_handler);
    F(sgx_enclave_run, user_data); F(sgx_enclave_run, reserved);
    printf("\"sizes\": [%zu, %zu, %zu, %zu]}\n", sizeof(struct sgx_enclave_create),
           sizeof(struct sgx_enclave_add_pages), sizeof(struct sgx_enclave_init),
           sizeof(struct sgx_enclave_run));
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The header's numbers and layouts, from a program compiled against it."""
    if not os.path.exists(HEADER) or not shutil.which("gcc"):
        pytest.skip(f"needs gcc and {HEADER} (linux-libc-dev)")
    directory = tmp_path_factory.mktemp("probe")
    (directory / "probe.c").write_text(PROBE)
    subprocess.run(["gcc", "-o", str(directory / "probe"), str(directory / "probe.c")],
                   check=True)
    out = subprocess.run([str(directory / "probe")], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def test_ioctl_numbers_match_the_kernel_header(kernel):
    assert (sgx.SGX_IOC_ENCLAVE_CREATE, sgx.SGX_IOC_ENCLAVE_ADD_PAGES,
            sgx.SGX_IOC_ENCLAVE_INIT, sgx.SGX_PAGE_MEASURE) == \
        (kernel["create"], kernel["add_pages"], kernel["init"], kernel["measure"])


def test_struct_layouts_match_the_kernel_header(kernel):
    structs = ["sgx_enclave_create", "sgx_enclave_add_pages", "sgx_enclave_init",
               "sgx_enclave_run"]
    assert [sgx.ffi.sizeof(f"struct {s}") for s in structs] == kernel["sizes"]
    fields = {key: value for key, value in kernel.items() if "." in key}
    assert len(fields) == 16
    for key, (offset, size) in fields.items():
        name, field = key.split(".")
        ctype = sgx.ffi.typeof(f"struct {name}")
        assert sgx.ffi.offsetof(ctype, field) == offset, key
        assert sgx.ffi.sizeof(dict(ctype.fields)[field].type) == size, key


class RecordingDevice(sgx.Driver):
    """Stands in for /dev/sgx_enclave: records each request, decoded."""

    def __init__(self, init_result=0):
        self.calls = []
        self.init_result = init_result
        self.pages = []  # (offset, secinfo flags, bytes) as the driver got them

    def open(self, path):
        self.calls.append(("open", path))
        self.fd = os.memfd_create("recording-sgx")
        return self.fd

    def mmap(self, addr, size, prot, flags, fd, offset=0):
        self.calls.append(("mmap", addr, size, prot, flags, fd == self.fd))
        return _mmap(addr, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)

    def munmap(self, addr, size):
        self.calls.append(("munmap", addr, size))
        release(addr, size)

    def ioctl(self, fd, request, arg):
        buf = lambda addr, size: bytes(sgx.ffi.buffer(  # noqa: E731
            sgx.ffi.cast("char *", addr), size))
        if request == sgx.SGX_IOC_ENCLAVE_CREATE:
            size, base, ssa = struct.unpack_from("<QQI", buf(arg.src, PAGE))
            attributes, xfrm = struct.unpack_from("<QQ", buf(arg.src, PAGE), 48)
            os.ftruncate(self.fd, size)
            self.calls.append(("create", size, base, ssa, attributes, xfrm))
        elif request == sgx.SGX_IOC_ENCLAVE_ADD_PAGES:
            flags, = struct.unpack("<Q", buf(arg.secinfo, 8))
            assert arg.secinfo % 64 == 0 and arg.src % PAGE == 0
            data = buf(arg.src, arg.length)
            for at in range(0, arg.length, PAGE):
                self.pages.append((arg.offset + at, flags, data[at:at + PAGE]))
            os.pwrite(self.fd, data, arg.offset)
            self.calls.append(("add_pages", arg.offset, arg.length, flags, arg.flags))
            arg.count = arg.length
        elif request == sgx.SGX_IOC_ENCLAVE_INIT:
            self.calls.append(("init", buf(arg.sigstruct, 1808)))
            return self.init_result
        else:
            raise AssertionError(f"unexpected request {request:#x}")
        return 0

    def close(self, fd):
        self.calls.append(("close",))
        os.close(fd)


@pytest.fixture(scope="module")
def signed(make_signed_image):
    return make_signed_image(3 << 20)


def _measure(pages, size, ssa):
    """MRENCLAVE of the pages the device was given, from DESIGN §5's records."""
    h = hashlib.sha256(b"ECREATE\0" + struct.pack("<IQ", ssa, size) + bytes(44))
    for offset, flags, page in pages:
        h.update(b"EADD\0\0\0\0" + struct.pack("<QQ", offset, flags) + bytes(40))
        for at in range(0, PAGE, 256):
            h.update(b"EEXTEND\0" + struct.pack("<Q", offset + at) + bytes(48)
                     + page[at:at + 256])
    return h.digest()


def test_build_issues_the_requests_of_design_5(signed):
    image = load_image(signed)
    device = RecordingDevice()
    size, body = image.enclave_size, len(image.data) - PAGE

    enclave = sgx.build(image, driver=device, device="/dev/sgx_enclave")
    try:
        calls = device.calls
        assert calls[0] == ("open", "/dev/sgx_enclave")
        assert calls[1] == ("mmap", 0, 2 * size, 0, sgx.MAP_SHARED, True)
        trims = [c for c in calls[2:] if c[0] == "munmap"]
        assert sum(c[2] for c in trims) == size
        rest = calls[2 + len(trims):]
        assert rest[0] == ("create", size, enclave.base, 1, 0x4, 0x3)
        assert rest[1] == ("add_pages", 0, PAGE, 0x100, 1)
        assert rest[2] == ("add_pages", PAGE, body, 0x207, 1)
        zeros = [(c[1], c[2]) for c in rest[3:-1]]
        assert all(c[0] == "add_pages" and c[3:] == (0x207, 1) for c in rest[3:-1])
        assert zeros[0][0] == len(image.data)
        assert sum(length for _, length in zeros) == image.mmap_size - len(image.data)
        assert rest[-1] == ("init", (signed / "encl.ss").read_bytes())
        assert _measure(device.pages, size, 1) == image.sigstruct.enclave_hash
        assert [(e.addr, e.size, e.execute, e.share) for e in enclave.layout] == [
            (enclave.base, PAGE, False, True),
            (enclave.base + PAGE, image.mmap_size - PAGE, True, True)]
        assert enclave.oentry == struct.unpack_from("<Q", image.data, 32)[0]
    finally:
        enclave.close()


def test_null_dereference_build_starts_the_enclave_at_0(signed, tmp_path):
    for name in ("encl.bin", "encl.ss"):
        shutil.copy(signed / name, tmp_path / name)
    sgxsign.sign(signed / "key.pem", tmp_path / "encl.bin", tmp_path / "encl.ss",
                 mmap_size=1 << 20, null_dereference_protection=True)
    image = load_image(tmp_path)
    device = RecordingDevice()

    with sgx.build(image, driver=device, device="/dev/sgx_enclave") as enclave:
        assert not [c for c in device.calls if c[0] == "mmap"]
        assert device.calls[1] == ("create", 2 << 20, 0, 1, 0x4, 0x3)
        assert device.calls[2] == ("add_pages", 0x1000, PAGE, 0x100, 1)
        assert enclave.layout[0].addr == 0x1000


@pytest.mark.parametrize("code, message", [
    (8, "signature does not verify"), (4, "MRENCLAVE mismatch"),
    (2, "outside the SIGSTRUCT's masks"), (16, "launch token is invalid")])
def test_einit_error_codes_are_named(signed, code, message):
    device = RecordingDevice(init_result=code)
    with pytest.raises(EinitError, match=message):
        sgx.build(load_image(signed), driver=device, device="/dev/sgx_enclave")
    assert device.calls[-1] == ("close",)


@pytest.mark.parametrize("present, message", [
    ("/dev/sgx/enclave", "belongs to the out-of-tree DCAP driver, which is not "
                         "supported"),
    ("/dev/isgx", "belongs to the legacy out-of-tree isgx driver"),
    (None, "needs /dev/sgx_enclave, not found on this host"),
])
def test_detect_names_what_it_found(present, message):
    with pytest.raises(BackendError, match=message):
        sgx.detect(exists=lambda path: path == present)
    assert sgx.detect(exists=lambda path: True) == "/dev/sgx_enclave"


def test_vdso_lookup_finds_a_known_symbol():
    """The parser that finds __vdso_sgx_enter_enclave, tried on a symbol every
    x86-64 vDSO has."""
    addr = sgx.vdso_symbol("__vdso_clock_gettime")
    with open("/proc/self/maps") as maps:
        vdso = next(line for line in maps if line.rstrip().endswith("[vdso]"))
    start, end = (int(x, 16) for x in vdso.split()[0].split("-"))
    assert start <= addr < end


def test_get_backend_refuses_sgx_without_the_device():
    if os.path.exists(sgx.DEVICE):
        pytest.skip("this host has an SGX device")
    with pytest.raises(BackendError, match="not found on this host"):
        get_backend("sgx")


class RecordingVdso:
    """Stands in for __vdso_sgx_enter_enclave: records each EENTER and plays
    the enclave's stub (ECALL 0 writes the greeting, ECALL 1 a REPORT)."""

    def __init__(self, exit_leaf=sgx.ENCLU_EEXIT):
        self.calls = []
        self.exit_leaf = exit_leaf

    def __call__(self, rdi, rsi, rdx, leaf, r8, r9, run):
        self.calls.append((rdi, rsi, rdx, leaf, r8, r9, run.tcs))
        buf = sgx.ffi.cast("char *", rsi)
        if rdi == 0:
            sgx.ffi.memmove(buf, b"Hello Inclavare Containers!\0", 28)
        elif rdi == 1:
            call = bytes(sgx.ffi.buffer(buf, 576))
            sgx.ffi.memmove(buf + 576, call[512:] + call[:368], 432)
        run.function = self.exit_leaf
        return 0


@pytest.fixture
def entered(signed, monkeypatch):
    """An sgx enclave built on the recording device, entered through a
    recording vDSO function."""
    vdso = RecordingVdso()
    monkeypatch.setattr(sgx, "vdso_enter_enclave", lambda: vdso)
    enclave = sgx.build(load_image(signed), driver=RecordingDevice(),
                        device="/dev/sgx_enclave")
    yield enclave, vdso
    enclave.close()


def test_ecall_0_eenters_the_tcs_with_the_ecall_number_in_rdi(entered):
    enclave, vdso = entered

    assert enclave.ecall(0) == "Hello Inclavare Containers!"

    (rdi, rsi, rdx, leaf, r8, r9, tcs), = vdso.calls
    assert (rdi, rdx, leaf, r8, r9) == (0, 0, sgx.ENCLU_EENTER, 0, 0)
    assert tcs == enclave.layout[0].addr and rsi != 0


def test_ecall_1_passes_targetinfo_and_data_in_and_reads_the_report_after(entered):
    enclave, vdso = entered
    targetinfo, report_data = bytes(range(256)) * 2, bytes(range(64, 128))

    report = enclave.report(targetinfo, report_data)

    assert [call[0] for call in vdso.calls] == [1]
    assert report == report_data + targetinfo[:368]


def test_an_ecall_that_does_not_leave_by_eexit_is_an_error(entered):
    enclave, vdso = entered
    vdso.exit_leaf = 0  # what the vDSO reports for an exception in the enclave

    with pytest.raises(BackendError, match="ECALL 0 did not return by EEXIT"):
        enclave.ecall(0)


def test_sgx_enclave_has_no_directly_callable_body(entered):
    enclave, _ = entered
    with pytest.raises(BackendError, match="entered with EENTER"):
        enclave.body_address()
