"""The PAL life cycle: from the pool, by building, and without epm."""

import ctypes
import errno
import mmap
import os
import shutil
import signal
import socket
import time

import pytest
from structlog.testing import capture_logs

from epm_client import Client
from skeleton.pal import Pal, PalError, parse_args

GREETING = "Hello Inclavare Containers!"


def launch(image_dir, args):
    """init, run the workload once, destroy; return (source, greeting)."""
    pal = Pal()
    pal.init(args, image_dir=image_dir)
    read, write = os.pipe()
    try:
        pid = pal.create_process("/bin/skeleton", ["skeleton"], stdio=(0, write, 2))
        assert pal.exec(pid) == 0
        os.close(write)
        write = None
        greeting = os.read(read, 256).decode().strip()
    finally:
        os.close(read)
        if write is not None:
            os.close(write)
        pal.destroy()
    return pal.source, greeting


def test_arguments_split_on_commas_and_spaces():
    flags, values = parse_args("sim,no-epm debug  epm-socket=/x/y.sock,")
    assert flags == {"sim", "no-epm", "debug"}
    assert values == {"epm-socket": "/x/y.sock"}


@pytest.mark.parametrize("word", ["bogus-arg", "sim=1", "tls", "no_epm"])
def test_an_unknown_argument_is_refused_and_the_known_ones_listed(word):
    with pytest.raises(PalError, match=f"unknown PAL argument '{word}'; known "
                                       "arguments: debug, no-epm, sim, ") as e:
        parse_args(f"sim {word}")
    assert e.value.errno == errno.EINVAL
    assert "kvm-kernel=" in str(e.value) and "epm-socket=" in str(e.value)


def test_every_documented_argument_is_accepted():
    """DESIGN §6's list, and ours."""
    flags, values = parse_args(
        "debug no-epm sim no-sgx-flc backend-kvm kvm-kernel=k kvm-rootfs=r "
        "kvm-init=i attester=a verifier=v tls=t crypto=c epm-socket=s subtype=x")
    assert len(flags) == 5 and len(values) == 9


def test_init_refuses_an_unknown_argument(images):
    with pytest.raises(PalError, match="'bogus-arg'") as e:
        Pal().init("sim bogus-arg", image_dir=images / "8")
    assert e.value.errno == errno.EINVAL


def test_arguments_come_from_the_environment_when_none_are_given(images):
    """DESIGN §6: ENCLAVE_RUNTIME_ARGS, separated by commas or spaces."""
    pal = Pal()
    pal.init("", image_dir=images / "8",
             environ={"ENCLAVE_RUNTIME_ARGS": "sim,no-epm"})
    try:
        assert pal.source == "built" and pal.enclave.backend == "sim"
    finally:
        pal.destroy()


def test_empty_pool_builds_and_the_next_launch_uses_the_pool(daemon, images):
    args = f"sim epm-socket={daemon.grpc_socket}"
    assert launch(images / "8", args) == ("built", GREETING)
    with Client(daemon.grpc_socket) as client:
        assert [e.state for e in client.list()] == ["available"]
    assert launch(images / "8", args) == ("pool", GREETING)
    assert launch(images / "8", args) == ("pool", GREETING)
    with Client(daemon.grpc_socket) as client:
        assert [e.state for e in client.list()] == ["available"]


def test_enclave_is_held_while_the_container_runs(daemon, images):
    pal = Pal()
    pal.init(f"sim epm-socket={daemon.grpc_socket}", image_dir=images / "8")
    try:
        with Client(daemon.grpc_socket) as client:
            assert [e.state for e in client.list()] == ["held"]
    finally:
        pal.destroy()


def test_pooled_enclave_stays_held_in_the_pool_while_the_container_runs(
        daemon, images):
    """A pool launch checks out with hold: the same entry, held, then available."""
    args = f"sim epm-socket={daemon.grpc_socket}"
    launch(images / "8", args)
    with Client(daemon.grpc_socket) as client:
        [before] = client.list()
        pal = Pal()
        pal.init(args, image_dir=images / "8")
        try:
            assert pal.source == "pool"
            # Leased until the daemon sees the reply read: at its next tick.
            deadline = time.monotonic() + 5
            while (client.list()[0].state == "leased"
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            assert [(e.id, e.state) for e in client.list()] == [(before.id, "held")]
        finally:
            pal.destroy()
        assert [(e.id, e.state) for e in client.list()] == [
            (before.id, "available")]


def test_pool_does_not_mix_image_sizes(daemon, images):
    args = f"sim epm-socket={daemon.grpc_socket}"
    launch(images / "8", args)
    assert launch(images / "32", args)[0] == "built"
    assert launch(images / "8", args)[0] == "pool"


def test_no_epm_never_contacts_the_daemon(tmp_path, images):
    """Sockets that record any connection stand where the daemon's would."""
    listeners = []
    for name in ("epm.sock", "epm-handoff.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / name))
        s.listen(8)
        s.setblocking(False)
        listeners.append(s)
    try:
        args = f"sim no-epm epm-socket={tmp_path / 'epm.sock'}"
        assert launch(images / "8", args) == ("built", GREETING)
        for s in listeners:
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in listeners:
            s.close()


def test_daemon_down_builds_and_warns(tmp_path, images):
    with capture_logs() as logs:
        source, greeting = launch(images / "8", f"sim epm-socket={tmp_path}/epm.sock")
    assert (source, greeting) == ("built", GREETING)
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert "epm_unreachable" in warnings


def test_mapping_conflict_returns_the_enclave_and_builds(daemon, images):
    args = f"sim epm-socket={daemon.grpc_socket}"
    launch(images / "8", args)
    with Client(daemon.grpc_socket) as client:
        [entry] = client.list()
    blocker = _block_a_page_of(entry.layout)
    try:
        with capture_logs() as logs:
            assert launch(images / "8", args) == ("built", GREETING)
        assert "enclave_mapping_conflict" in [e["event"] for e in logs]
        assert ctypes.string_at(blocker, 4) == b"mine"
    finally:
        _libc.munmap(ctypes.c_void_p(blocker), mmap.PAGESIZE)
    with Client(daemon.grpc_socket) as client:
        entries = client.list()
    assert sorted(e.state for e in entries) == ["available", "available"]
    assert entry.id in [e.id for e in entries]


def test_workload_is_killed_by_pal_kill(tmp_path, images):
    pal = Pal()
    pal.init("sim no-epm", image_dir=images / "8")
    try:
        read, write = os.pipe()
        pid = pal.create_process("/bin/skeleton", ["skeleton", "wait_timeout", "60"],
                                 stdio=(0, write, write))
        os.close(write)
        assert os.read(read, 256).decode().strip() == GREETING
        pal.kill(-1, signal.SIGTERM)
        assert pal.exec(pid) == -signal.SIGTERM
        os.close(read)
        with pytest.raises(PalError) as e:
            pal.kill(os.getpid(), signal.SIGTERM)
        assert e.value.errno == errno.ESRCH
    finally:
        pal.destroy()


def test_calls_before_init_fail_with_a_message():
    pal = Pal()
    for call in (lambda: pal.create_process("/bin/x"), lambda: pal.exec(1),
                 lambda: pal.kill(1, 9), pal.destroy):
        with pytest.raises(PalError, match="before pal_init"):
            call()


def test_missing_image_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(PalError, match="encl.bin"):
        Pal().init("sim no-epm", image_dir=tmp_path)


def test_without_sim_and_without_a_device_init_refuses(images):
    if os.path.exists("/dev/sgx_enclave"):
        pytest.skip("this host has an SGX device")
    with pytest.raises(PalError) as e:
        Pal().init("no-epm", image_dir=images / "8", environ={})
    assert e.value.errno == errno.ENODEV
    assert "the PAL argument `sim`, or SGX_MODE=SIM" in str(e.value)


@pytest.fixture
def image_copy(images, tmp_path):
    for name in ("encl.bin", "encl.ss"):
        shutil.copy(images / "8" / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("name, make, err", [
    ("encl.ss", lambda p: p.write_bytes(b""), errno.EINVAL),
    ("encl.bin", lambda p: p.mkdir(), errno.EISDIR),
    ("encl.ss", lambda p: p.mkdir(), errno.EISDIR),
    ("encl.bin", lambda p: os.mkfifo(p), errno.EINVAL),
    ("encl.bin", lambda p: p.symlink_to("/dev/zero"), errno.EINVAL),
    ("encl.bin", lambda p: None, errno.ENOENT),
])
def test_an_unusable_image_file_has_its_own_errno(image_copy, name, make, err):
    """Only a missing file is ENOENT; none of these blocks or reads a device."""
    (image_copy / name).unlink()
    make(image_copy / name)
    with pytest.raises(PalError, match=name) as e:
        Pal().init("sim no-epm", image_dir=image_copy)
    assert e.value.errno == err


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FIXED_NOREPLACE = 0x100000


def _block_a_page_of(layout):
    """Map a page of our own inside the enclave's range and return it.

    Other threads (gRPC's among them) may already have taken part of the
    freed range, so the first page that is still free is the one used.
    """
    for entry in layout:
        for addr in range(entry.addr, entry.addr + entry.size, mmap.PAGESIZE):
            got = _libc.mmap(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                             | _MAP_FIXED_NOREPLACE, -1, 0)
            if got == addr:
                ctypes.memmove(got, b"mine", 4)
                return got
            if got not in (None, ctypes.c_void_p(-1).value):
                _libc.munmap(ctypes.c_void_p(got), mmap.PAGESIZE)
    raise AssertionError("every page of the enclave's range is taken")


def test_run_executes_the_workload_in_this_process(images):
    """API v1: pal_exec runs the workload in place and returns its exit value."""
    pal = Pal()
    pal.init("sim no-epm", image_dir=images / "8")
    read, write = os.pipe()
    try:
        assert pal.run("/bin/skeleton", ["skeleton"], stdio=(0, write, write)) == 0
        os.close(write)
        assert os.read(read, 256).decode().splitlines()[0] == GREETING
    finally:
        os.close(read)
        pal.destroy()


def test_host_enclave_is_used_and_left_to_the_host(images):
    """API v3 with fd and addr: nothing is built, and destroy keeps the fd."""
    from skeleton.backends import sim
    from skeleton.image import load_image

    built = sim.build(load_image(images / "8"))
    built.unmap()
    try:
        pal = Pal()
        pal.init("sim no-epm", image_dir=images / "8", enclave_fd=built.fd,
                 enclave_addr=built.base)
        assert pal.source == "host"
        assert pal.enclave.base == built.base
        pal.destroy()
        os.fstat(built.fd)
    finally:
        built.close()


def test_local_report_checks_buffer_sizes(images):
    pal = Pal()
    pal.init("sim no-epm", image_dir=images / "8")
    try:
        with pytest.raises(PalError, match="expected 512") as e:
            pal.get_local_report(bytes(100), 432)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(PalError, match="needs 432"):
            pal.get_local_report(bytes(512), 431)
    finally:
        pal.destroy()


def test_local_report_is_verified_by_its_target(daemon, images):
    """A report from a pooled enclave, for a target, verifies as that target."""
    from skeleton import report
    from skeleton.image import load_image
    args = f"sim epm-socket={daemon.grpc_socket}"
    launch(images / "8", args)
    target = load_image(images / "32").identity("sim")
    targetinfo = report.targetinfo_for(target.mrenclave, target.attributes,
                                       target.xfrm)
    pal = Pal()
    pal.init(args, image_dir=images / "8")
    try:
        assert pal.source == "pool"
        raw = pal.get_local_report(targetinfo, 432)
    finally:
        pal.destroy()
    record = report.verify_report(report.load_secret(), raw, targetinfo)
    assert record.mrenclave == load_image(images / "8").identity("sim").mrenclave


def test_stderr_logger_writes_event_and_key_values_on_one_line(capfd):
    from skeleton import log as pal_log

    try:
        pal_log.use_stderr(pal_log.level_number("warning"))
        logger = pal_log.get_logger("test")
        logger.info("not_shown", a=1)
        logger.warning("epm_unreachable", error="no socket\nat all", action="building")
    finally:
        pal_log.use_structlog()
    assert capfd.readouterr().err == \
        "[warning] epm_unreachable error='no socket\\nat all' action=building\n"


def test_pooled_enclave_that_is_not_what_it_claims_is_discarded(daemon, images):
    """A zero-filled memfd checked in under the image's identity never runs."""
    import fcntl
    from skeleton.image import load_image
    identity = load_image(images / "8").identity("sim")
    args = f"sim epm-socket={daemon.grpc_socket}"
    launch(images / "8", args)
    with Client(daemon.grpc_socket) as client:
        [genuine] = client.list()
        layout = genuine.layout
        client.flush()
        fd = os.memfd_create("epm-sim-enclave", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, identity.size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        try:
            client.save_final(client.check_in(fd, "skeleton-0.0.0", layout, identity))
        finally:
            os.close(fd)

        with capture_logs() as logs:
            assert launch(images / "8", args) == ("built", GREETING)
        assert "pooled_enclave_unusable" in [e["event"] for e in logs]
        assert launch(images / "8", args) == ("pool", GREETING)
        assert len(client.list()) == 1
