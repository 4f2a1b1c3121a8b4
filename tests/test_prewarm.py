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
