"""Pre-warmed pools: reaching the target, refilling, recycle, run-time targets."""

import os
import time

import pytest

from epm_client import Client, errors
from epm_client.admin import AdminClient
from epm_server import config
from epm_server.errors import ConfigError
from skeleton.image import load_image


SUBTYPE = "warm-8"


def prewarm_config(images, count=2, recycle=False, subtype=SUBTYPE):
    return (f'[[prewarm]]\nimage = "{images / "8"}"\nsubtype = "{subtype}"\n'
            f'backend = "sim"\ncount = {count}\n'
            f'recycle = {"true" if recycle else "false"}\n')


def wait_available(admin, subtype, count, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [pool] = [p for p in admin.prewarm() if p.subtype == subtype]
        if pool.available == count and pool.building == 0:
            return pool
        time.sleep(0.05)
    raise AssertionError(f"{subtype}: {pool.available} available, not {count}")


def image_identity(images):
    from epm_client import Identity
    ident = load_image(images / "8").identity("sim")
    return Identity(*ident)


def test_reaches_the_target_and_refills_after_check_out(make_daemon, images):
    daemon = make_daemon(prewarm_config(images, count=2))
    with AdminClient(daemon.grpc_socket) as admin, Client(daemon.grpc_socket) as c:
        wait_available(admin, SUBTYPE, 2)
        assert len(daemon.events("enclave_prewarmed")) == 2

        out = c.check_out(SUBTYPE, image_identity(images))
        os.close(out.fd)

        wait_available(admin, SUBTYPE, 2)
    assert len(daemon.events("enclave_prewarmed")) == 3


def test_target_changes_at_run_time(make_daemon, images):
    daemon = make_daemon(prewarm_config(images, count=0))
    with AdminClient(daemon.grpc_socket) as admin:
        [pool] = admin.set_prewarm(SUBTYPE, 1)
        assert (pool.target, pool.recycle) == (1, False)
        wait_available(admin, SUBTYPE, 1)
        with pytest.raises(errors.NotFound, match="no \\[\\[prewarm\\]\\] image"):
            admin.set_prewarm("unregistered", 1)


def test_recycle_off_never_hands_a_returned_enclave_out(make_daemon, images):
    """A container's enclave checked back in is closed, not pooled again."""
    daemon = make_daemon(prewarm_config(images, count=1))
    ident = image_identity(images)
    with AdminClient(daemon.grpc_socket) as admin, Client(daemon.grpc_socket) as c:
        wait_available(admin, SUBTYPE, 1)
        out = c.check_out(SUBTYPE, ident)
        returned = c.check_in(out.fd, SUBTYPE, out.layout, ident)
        c.save_final(returned)
        os.close(out.fd)
        wait_available(admin, SUBTYPE, 1)

        ids = [e.id for e in c.list(SUBTYPE)]
        again = c.check_out(SUBTYPE, ident)
        os.close(again.fd)

    assert returned not in ids and again.pool_id != returned
    assert [e["id"] for e in daemon.events("enclave_not_recycled")] == [returned]


def test_recycle_on_reuses_a_returned_enclave(make_daemon, images):
    daemon = make_daemon(prewarm_config(images, count=1, recycle=True))
    ident = image_identity(images)
    with AdminClient(daemon.grpc_socket) as admin, Client(daemon.grpc_socket) as c:
        wait_available(admin, SUBTYPE, 1)
        out = c.check_out(SUBTYPE, ident)
        wait_available(admin, SUBTYPE, 1)
        returned = c.check_in(out.fd, SUBTYPE, out.layout, ident)
        c.save_final(returned)
        os.close(out.fd)

        assert returned in [e.id for e in c.list(SUBTYPE)]


@pytest.mark.parametrize("table, message", [
    ({"subtype": "s"}, "prewarm\\[0\\].image: missing"),
    ({"image": "/i", "subtype": "s", "backend": "tdx"}, "prewarm\\[0\\].backend"),
    ({"image": "/i", "subtype": "s", "count": -1}, "prewarm\\[0\\].count"),
    ({"image": "/i", "subtype": "s", "colour": 1}, "prewarm\\[0\\].colour: unknown"),
])
def test_a_bad_prewarm_table_is_named(table, message):
    with pytest.raises(ConfigError, match=message):
        config.parse({"prewarm": [table]})


def test_other_images_of_a_pre_warmed_subtype_still_recycle(make_daemon, images):
    """Recycle off applies to the pre-warmed image, not to its whole subtype.

    The skeleton's sizes share one subtype: pre-warming the 8 MiB image must
    not stop 32 MiB enclaves from going back to the pool.
    """
    daemon = make_daemon(prewarm_config(images, count=1))
    from test_pal import launch
    args = f"sim epm-socket={daemon.grpc_socket} subtype={SUBTYPE}"
    assert launch(images / "32", args)[0] == "built"
    assert launch(images / "32", args)[0] == "pool"
    assert daemon.events("enclave_not_recycled") == []


def test_a_pre_warmed_image_that_cannot_be_read_stops_the_daemon(tmp_path):
    import subprocess
    import sys
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[grpc]\naddress = "{tmp_path}/run/epm.sock"\n'
                   f'[[prewarm]]\nimage = "{tmp_path}/missing"\n'
                   'subtype = "s"\ncount = 1\n')
    result = subprocess.run([sys.executable, "-m", "epm_server.main", "--config",
                             str(cfg)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"epm: {cfg}: prewarm[0].image: ")
    assert "encl.bin" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "run" / "epm.sock").exists()


def copy_image(images, tmp_path):
    import shutil
    copy = tmp_path / "image"
    copy.mkdir()
    for name in ("encl.bin", "encl.ss"):
        shutil.copy(images / "8" / name, copy / name)
    return copy


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# A byte of the image's second page (measured, neither the TCS nor the
# metadata), and one of the SIGSTRUCT's signature (DESIGN section 5).
IMAGE_BYTE = 4096 + 64
SIGNATURE_BYTE = 516 + 10


@pytest.mark.parametrize("name, offset, reason", [
    ("encl.bin", IMAGE_BYTE, "MRENCLAVE mismatch"),
    ("encl.ss", SIGNATURE_BYTE, "signature does not verify"),
])
def test_a_pre_warmed_image_that_does_not_verify_stops_the_daemon(
        tmp_path, images, name, offset, reason):
    """Like an unreadable image: exit 2 and one line naming the table."""
    import subprocess
    import sys
    image = copy_image(images, tmp_path)
    flip(image / name, offset)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'root = "{tmp_path}/root"\ndb_path = "{tmp_path}/db"\n'
                   f'[grpc]\naddress = "{tmp_path}/run/epm.sock"\n'
                   f'[[prewarm]]\nimage = "{image}"\nsubtype = "s"\ncount = 1\n')
    result = subprocess.run([sys.executable, "-m", "epm_server.main", "--config",
                             str(cfg)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"epm: {cfg}: prewarm[0].image: {image}: ")
    assert reason in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_an_image_repaired_after_a_failed_build_is_read_again(tmp_path, images):
    """A build that failed reads the image again: the repaired file is used,
    not the broken one read before."""
    from epm_server.config import PrewarmSpec
    from epm_server.pool import Pool
    from epm_server.prewarm import Prewarmer
    image = copy_image(images, tmp_path)
    good = (image / "encl.bin").read_bytes()
    flip(image / "encl.bin", IMAGE_BYTE)
    pool = Pool(8, 8)
    prewarmer = Prewarmer(pool, [PrewarmSpec(image=str(image), subtype="r",
                                             count=1)], builders=1)
    prewarmer.start()
    try:
        wait_for(lambda: prewarmer.targets()[0].failures)
        [broken] = prewarmer.targets()
        (image / "encl.bin").write_bytes(good)
        prewarmer.set_target("r", 1)  # retry now, not in 5 s
        wait_for(lambda: prewarmer.targets()[0].available == 1)
        [repaired] = prewarmer.targets()
    finally:
        prewarmer.stop()
        pool.close()

    assert "MRENCLAVE mismatch" in broken.last_error
    assert broken.last_error_at > 0
    assert repaired.failures == 0 and repaired.last_error == broken.last_error


def test_an_image_changed_since_start_is_not_pre_warmed(tmp_path, images,
                                                        make_signed_image):
    """Recycling rules were set for the identity read at start: a re-read
    image with another measurement is refused, with the reason shown."""
    import shutil
    from epm_server.config import PrewarmSpec
    from epm_server.pool import Pool
    from epm_server.prewarm import Prewarmer, load_verified
    image = copy_image(images, tmp_path)
    # sgx: no device here, so every build fails and the image is read again.
    spec = PrewarmSpec(image=str(image), subtype="c", backend="sgx", count=1)
    started = load_verified(spec)
    other = make_signed_image(8 << 20)
    for name in ("encl.bin", "encl.ss"):
        shutil.copy(other / name, image / name)
    pool = Pool(8, 8)
    prewarmer = Prewarmer(pool, [spec], builders=1, images={"c": started})
    prewarmer.start()
    try:
        wait_for(lambda: prewarmer.targets()[0].failures == 1)
        prewarmer.set_target("c", 1)
        wait_for(lambda: prewarmer.targets()[0].failures == 2)
        [changed] = prewarmer.targets()
    finally:
        prewarmer.stop()
        pool.close()

    assert changed.last_error.startswith(f"{image} changed since the daemon "
                                         "started (MRENCLAVE ")
    assert changed.last_error.endswith("restart epm to pre-warm it")
