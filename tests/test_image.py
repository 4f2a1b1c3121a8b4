"""Reading encl.bin and encl.ss: what an image exposes, and errors naming the file."""

import contextlib
import errno
import hashlib
import os
import shutil
import signal

import pytest

from skeleton import build_image, sgxsign
from skeleton.errors import ImageError
from skeleton.image import (MAX_ENCLAVE_SIZE, MAX_IMAGE_SIZE, check_host,
                            host_mmap_min_addr, load_image)

PAGE = 4096


@pytest.fixture(scope="module")
def signed(make_signed_image):
    """A directory with an image signed for an 8 MiB mmap size."""
    return make_signed_image(8 << 20)


@pytest.fixture
def copy(signed, tmp_path):
    for name in ("encl.bin", "encl.ss"):
        shutil.copy(signed / name, tmp_path / name)
    return tmp_path


def test_built_image_is_whole_pages_plus_the_metadata_record(tmp_path):
    size = build_image.build(tmp_path / "encl.bin")
    assert size % PAGE == 17
    assert (tmp_path / "encl.bin").read_bytes()[-17:] == bytes(17)


def test_image_exposes_geometry_and_identity(signed):
    image = load_image(signed)
    sigstruct = (signed / "encl.ss").read_bytes()

    identity = image.identity("sim")

    assert len(image.data) % PAGE == 0
    assert image.metadata.max_mmap_size == 8 << 20
    assert (image.mmap_size, image.enclave_size, image.encl_offset) == \
        (8 << 20, 8 << 20, 0)
    assert image.ssa_frame_pages == 1
    assert identity.mrenclave == sigstruct[960:992]
    assert identity.mrsigner == hashlib.sha256(sigstruct[128:512]).digest()
    assert (identity.attributes, identity.xfrm) == (0x4, 0x3)
    assert (identity.size, identity.backend) == (8 << 20, "sim")


@pytest.mark.parametrize("name", ["encl.bin", "encl.ss"])
def test_a_missing_file_is_named(copy, name):
    (copy / name).unlink()
    with pytest.raises(ImageError, match=f"{name}: no such file"):
        load_image(copy)


@contextlib.contextmanager
def _prompt(seconds=5):
    """Fail, rather than hang, when the body blocks for ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_symbolic_links_to_the_files_are_followed(copy, tmp_path_factory):
    linked = tmp_path_factory.mktemp("linked")
    for name in ("encl.bin", "encl.ss"):
        (linked / name).symlink_to(copy / name)
    assert load_image(linked).sigstruct == load_image(copy).sigstruct


@pytest.mark.parametrize("name", ["encl.bin", "encl.ss"])
def test_a_fifo_is_refused_without_blocking(copy, name):
    (copy / name).unlink()
    os.mkfifo(copy / name)
    with _prompt(), pytest.raises(ImageError, match=f"{name}: not a regular file") as e:
        load_image(copy)
    assert e.value.errno == errno.EINVAL


def test_a_device_is_refused_before_it_is_read(copy):
    (copy / "encl.bin").unlink()
    (copy / "encl.bin").symlink_to("/dev/zero")
    with _prompt(), pytest.raises(ImageError, match="encl.bin: not a regular file"):
        load_image(copy)


@pytest.mark.parametrize("name", ["encl.bin", "encl.ss"])
def test_a_directory_is_named_with_eisdir(copy, name):
    (copy / name).unlink()
    (copy / name).mkdir()
    with pytest.raises(ImageError, match=f"{name}: is a directory") as e:
        load_image(copy)
    assert e.value.errno == errno.EISDIR


def test_a_missing_file_has_enoent(copy):
    (copy / "encl.ss").unlink()
    with pytest.raises(ImageError) as e:
        load_image(copy)
    assert e.value.errno == errno.ENOENT


def test_an_image_over_the_cap_is_refused_unread(copy):
    """A sparse file costs nothing on disk; reading it whole would."""
    os.truncate(copy / "encl.bin", MAX_IMAGE_SIZE + PAGE)
    with _prompt(), pytest.raises(
            ImageError, match=f"encl.bin: too large \\({MAX_IMAGE_SIZE + PAGE} "
                              f"bytes, at most {MAX_IMAGE_SIZE}\\)") as e:
        load_image(copy)
    assert e.value.errno == errno.EFBIG


def test_a_sigstruct_over_its_size_is_refused(copy):
    (copy / "encl.ss").write_bytes(bytes(1809))
    with pytest.raises(ImageError, match=r"encl.ss: too large \(1809 bytes, at most "
                                         r"1808\)"):
        load_image(copy)


def test_metadata_asking_for_a_huge_enclave_is_refused(copy):
    data = bytearray((copy / "encl.bin").read_bytes())
    last_page = len(data) - len(data) % PAGE
    data[last_page:last_page + 8] = (1 << 40).to_bytes(8, "little")
    (copy / "encl.bin").write_bytes(data)
    with pytest.raises(ImageError, match=f"encl.bin: enclave size 0x10000000000 is "
                                         f"too large \\(at most {MAX_ENCLAVE_SIZE:#x}"):
        load_image(copy)


def test_a_truncated_sigstruct_is_named(copy):
    (copy / "encl.ss").write_bytes(bytes(1000))
    with pytest.raises(ImageError, match="encl.ss: expected a 1808-byte SIGSTRUCT"):
        load_image(copy)


def test_a_sigstruct_with_a_bad_header_is_named(copy):
    (copy / "encl.ss").write_bytes(bytes(1808))
    with pytest.raises(ImageError, match=r"encl.ss: not a SIGSTRUCT \(bad header\)"):
        load_image(copy)


def test_a_too_small_image_is_named(copy):
    (copy / "encl.bin").write_bytes(bytes(100))
    with pytest.raises(ImageError, match="encl.bin: 100 bytes is too small"):
        load_image(copy)


def test_bad_metadata_is_named(copy):
    data = bytearray((copy / "encl.bin").read_bytes())
    last_page = len(data) - len(data) % PAGE
    data[last_page:last_page + 8] = (PAGE).to_bytes(8, "little")
    (copy / "encl.bin").write_bytes(data)
    with pytest.raises(ImageError, match="encl.bin: max_mmap_size 4096 is below"):
        load_image(copy)


def test_image_exposes_the_body_from_its_entry_record(signed):
    """OENTRY is the entry stub; the entry record after the TCS names the C body."""
    image = load_image(signed)
    data = image.data

    assert data[PAGE:PAGE + 8] == b"EPMBODY\0"
    assert image.body == int.from_bytes(data[PAGE + 8:PAGE + 16], "little")
    oentry = int.from_bytes(data[32:40], "little")
    assert PAGE < oentry < image.body < len(data)


def test_a_missing_entry_record_is_named(copy):
    data = bytearray((copy / "encl.bin").read_bytes())
    data[PAGE:PAGE + 8] = bytes(8)
    (copy / "encl.bin").write_bytes(data)
    with pytest.raises(ImageError, match="encl.bin: no entry record .*make image"):
        load_image(copy)


def test_a_body_outside_the_image_is_named(copy):
    data = bytearray((copy / "encl.bin").read_bytes())
    data[PAGE + 8:PAGE + 16] = (1 << 40).to_bytes(8, "little")
    (copy / "encl.bin").write_bytes(data)
    with pytest.raises(ImageError, match="body 0x10000000000 is outside the image"):
        load_image(copy)


def test_an_entry_outside_the_image_is_named(copy):
    data = bytearray((copy / "encl.bin").read_bytes())
    data[32:40] = (1 << 40).to_bytes(8, "little")
    (copy / "encl.bin").write_bytes(data)
    with pytest.raises(ImageError, match="encl.bin: TCS OENTRY 0x10000000000"):
        load_image(copy)


def _protected(copy, mmap_min_addr):
    sgxsign.sign(copy / "key.pem", copy / "encl.bin", copy / "encl.ss",
                 mmap_size=8 << 20, null_dereference_protection=True,
                 mmap_min_addr=mmap_min_addr)
    return load_image(copy)


@pytest.fixture
def keyed(copy, signed):
    shutil.copy(signed / "key.pem", copy / "key.pem")
    return copy


def test_check_host_warns_when_protection_is_off(signed):
    warnings = check_host(load_image(signed), mmap_min_addr=4096)
    assert len(warnings) == 1
    assert warnings[0].startswith("NULL-dereference protection is off")


def test_check_host_accepts_the_signed_mmap_min_addr(keyed):
    assert check_host(_protected(keyed, 0x10000), mmap_min_addr=0x10000) == []


def test_check_host_refuses_another_mmap_min_addr(keyed):
    image = _protected(keyed, 0x10000)
    with pytest.raises(ImageError, match="signed for vm.mmap_min_addr 0x10000 with "
                                         "NULL-dereference protection, but this "
                                         "host has 0x1000"):
        check_host(image, mmap_min_addr=0x1000)


def test_check_host_reads_this_hosts_mmap_min_addr(keyed):
    assert host_mmap_min_addr() == 4096
    assert check_host(_protected(keyed, 4096)) == []


def test_a_mmap_size_below_the_image_names_the_minimum(copy):
    data = bytearray((copy / "encl.bin").read_bytes())
    last_page = len(data) - len(data) % PAGE
    data[last_page:last_page + 8] = (PAGE).to_bytes(8, "little")
    (copy / "encl.bin").write_bytes(data)
    minimum = (len(data) - len(data) % PAGE + PAGE) + PAGE  # image, SSA frame
    with pytest.raises(ImageError, match=f"the minimum is {minimum} "):
        load_image(copy)
