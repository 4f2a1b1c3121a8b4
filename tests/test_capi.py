"""The PAL libraries, driven by a C host the way rune drives them.

tests/host/pal_host.c knows nothing of Python: it dlopens a library with
RTLD_LOCAL, changes root into a directory holding only the signed image and
var/run/epm, and only then calls pal_init, as rune does around pivot_root.
"""

import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from epm_client import Client

REPO = pathlib.Path(__file__).resolve().parent.parent
HOST_SOURCE = REPO / "tests" / "host" / "pal_host.c"
GREETING = "Hello Inclavare Containers!"
SUCCESS = "the skeleton workload ran successfully"
HOST_TIMEOUT_S = 60

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")


def library(version):
    path = REPO / "build" / f"liberpal-skeleton-v{version}.so"
    if not path.exists():
        raise RuntimeError(f"no {path}: run `make pal`")
    return path


@pytest.fixture(scope="session")
def pal_host(tmp_path_factory):
    """The C host, compiled for this test run."""
    out = tmp_path_factory.mktemp("host") / "pal_host"
    subprocess.run(["gcc", "-Wall", "-O1", "-o", str(out), str(HOST_SOURCE),
                    "-ldl", "-lpthread"], check=True, capture_output=True)
    return out


def make_root(tmp_path, image_dir, daemon=None, name="root"):
    """A root holding only encl.bin, encl.ss and var/run/epm.

    The daemon's sockets appear in var/run/epm as hard links: a Unix socket
    is reached through its inode, so the link connects to the daemon.
    """
    root = tmp_path / name
    (root / "var" / "run" / "epm").mkdir(parents=True)
    for file in ("encl.bin", "encl.ss"):
        if (image_dir / file).exists():
            shutil.copy(image_dir / file, root / file)
    if daemon is not None:
        for sock in (daemon.grpc_socket, daemon.handoff_socket):
            os.link(sock, root / "var" / "run" / "epm" / sock.name)
    return root


def run_host(host, version, *options, pass_fds=(), env=None):
    """Run the host; return (results as a dict, its stderr)."""
    env = dict(os.environ if env is None else env)
    env.pop("SGX_MODE", None)
    proc = subprocess.run(
        [str(host), "-l", str(library(version)), "-V", str(version), *options],
        capture_output=True, text=True, timeout=HOST_TIMEOUT_S, pass_fds=pass_fds,
        env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        results[key] = value.replace("\\n", "\n")
    return results, proc.stderr


def as_ints(results, *keys):
    return [int(results[k]) for k in keys]


def test_each_library_exports_exactly_its_pal_api():
    expected = {
        1: {"pal_get_version", "pal_init", "pal_exec", "pal_destroy"},
        2: {"pal_get_version", "pal_init", "pal_create_process", "pal_exec",
            "pal_kill", "pal_destroy"},
    }
    expected[3] = expected[2] | {"pal_get_local_report"}
    for version, names in expected.items():
        out = subprocess.run(["nm", "-D", "--defined-only", str(library(version))],
                             check=True, capture_output=True, text=True).stdout
        assert {line.split()[-1] for line in out.splitlines()} == names


def test_v1_runs_the_workload_in_place(pal_host, tmp_path, images):
    root = make_root(tmp_path, images / "8")
    got, _ = run_host(pal_host, 1, "-r", str(root), "-a", "sim,no-epm")
    assert as_ints(got, "version", "init", "exec", "exit", "destroy") == [1, 0, 0, 0, 0]
    assert got["stdout"] == GREETING + "\n"
    assert got["stderr"] == SUCCESS + "\n"


@pytest.mark.parametrize("version", [2, 3])
def test_workload_runs_in_a_child_and_sigchld_harms_it_not(pal_host, tmp_path,
                                                          images, version):
    """pal_kill(-1, SIGCHLD), as rune forwards its own, kills nothing."""
    root = make_root(tmp_path, images / "8")
    got, _ = run_host(pal_host, version, "-r", str(root), "-a", "sim no-epm")
    assert as_ints(got, "version", "init", "create", "kill_sigchld", "exec",
                   "exit", "destroy") == [version, 0, 0, 0, 0, 0, 0]
    assert got["pid_is_child"] == "1"
    assert got["stdout"] == GREETING + "\n"
    assert got["stderr"] == SUCCESS + "\n"


@pytest.mark.parametrize("version", [2, 3])
def test_pal_kill_signals_only_the_pals_children(pal_host, tmp_path, images,
                                                 version):
    root = make_root(tmp_path, images / "8")
    got, stderr = run_host(pal_host, version, "-r", str(root), "-a", "sim no-epm",
                           "-w", "60")
    assert int(got["kill_stranger"]) == -errno.ESRCH
    assert "not a process of this PAL" in stderr
    assert as_ints(got, "kill", "exec", "exit") == [0, 0, -signal.SIGTERM]
    assert got["stdout"] == GREETING + "\n"
    assert got["stderr"] == ""


@pytest.mark.parametrize("version", [1, 2, 3])
def test_calls_before_init_fail_with_a_message(pal_host, tmp_path, images, version):
    root = make_root(tmp_path, images / "8")
    got, stderr = run_host(pal_host, version, "-r", str(root), "-a", "sim no-epm",
                           "-b")
    before = {k: int(v) for k, v in got.items() if k.startswith("before_")}
    assert before and set(before.values()) == {-errno.EINVAL}
    assert stderr.count("called before pal_init") == len(before)
    assert int(got["init"]) == 0


def test_missing_image_fails_init_with_one_line(pal_host, tmp_path):
    root = make_root(tmp_path, tmp_path / "nothing")
    got, stderr = run_host(pal_host, 3, "-r", str(root), "-a", "sim no-epm")
    assert int(got["init"]) == -errno.ENOENT
    [line] = stderr.splitlines()
    assert "pal_init_failed" in line and "encl.bin" in line


def test_an_unknown_argument_fails_init_with_one_line(pal_host, tmp_path, images):
    root = make_root(tmp_path, images / "8")
    got, stderr = run_host(pal_host, 3, "-r", str(root), "-a", "sim bogus-arg")
    assert int(got["init"]) == -errno.EINVAL
    [line] = stderr.splitlines()
    assert "'bogus-arg'" in line and "no-epm" in line


def test_arguments_from_the_environment_are_used(pal_host, tmp_path, images):
    root = make_root(tmp_path, images / "8")
    env = dict(os.environ, ENCLAVE_RUNTIME_ARGS="sim,no-epm")
    got, _ = run_host(pal_host, 3, "-r", str(root), env=env)
    assert as_ints(got, "init", "exec", "exit", "destroy") == [0, 0, 0, 0]


def test_without_sim_and_without_a_device_init_refuses(pal_host, tmp_path, images):
    if os.path.exists("/dev/sgx_enclave"):
        pytest.skip("this host has an SGX device")
    root = make_root(tmp_path, images / "8")
    got, stderr = run_host(pal_host, 2, "-r", str(root), "-a", "no-epm")
    assert int(got["init"]) == -errno.ENODEV
    [line] = stderr.splitlines()
    assert "sim" in line


@pytest.mark.parametrize("version", [1, 3])
def test_second_launch_takes_its_enclave_from_epm(pal_host, tmp_path, images,
                                                  daemon, version):
    """Built on the first launch, from the pool on the next; and the PAL has
    no thread but the host's when it forks (no gRPC on the launch path)."""
    args = "sim,epm-socket=/var/run/epm/epm.sock"
    sources = []
    for run in range(2):
        root = make_root(tmp_path, images / "8", daemon, name=f"root{run}")
        got, stderr = run_host(pal_host, version, "-r", str(root), "-a", args,
                               "-L", "debug")
        assert as_ints(got, "init", "exec", "exit", "destroy") == [0, 0, 0, 0]
        assert got["stdout"] == GREETING + "\n"
        if version != 1:
            assert got["threads"] == "1", got["thread_names"]
        sources += [line for line in stderr.splitlines() if "pal_initialized" in line]
        with Client(daemon.grpc_socket) as client:
            assert [e.state for e in client.list()] == ["available"]
    assert ["source=built" in sources[0], "source=pool" in sources[1]] == [True, True]


def test_calls_from_another_thread(pal_host, tmp_path, images, daemon):
    root = make_root(tmp_path, images / "8", daemon)
    got, _ = run_host(pal_host, 3, "-r", str(root), "-t", "-w", "60",
                      "-a", "sim epm-socket=/var/run/epm/epm.sock")
    assert as_ints(got, "init", "create", "kill", "exec", "exit", "destroy") == \
        [0, 0, 0, 0, -signal.SIGTERM, 0]
    assert got["stdout"] == GREETING + "\n"


def test_v3_uses_the_enclave_the_host_passes(pal_host, tmp_path, images):
    from skeleton.backends import sim
    from skeleton.image import load_image

    enclave = sim.build(load_image(images / "8"))
    try:
        enclave.unmap()
        root = make_root(tmp_path, images / "8")
        got, stderr = run_host(
            pal_host, 3, "-r", str(root), "-a", "sim no-epm", "-L", "debug",
            "-f", str(enclave.fd), "-A", hex(enclave.base), pass_fds=(enclave.fd,))
    finally:
        enclave.close()
    assert as_ints(got, "init", "exec", "exit", "destroy") == [0, 0, 0, 0]
    assert got["stdout"] == GREETING + "\n"
    assert "source=host" in stderr


def test_v3_report_checks_its_buffer_sizes(pal_host, tmp_path, images):
    root = make_root(tmp_path, images / "8")
    got, stderr = run_host(pal_host, 3, "-r", str(root), "-a", "sim no-epm", "-R")
    assert as_ints(got, "report_short", "report_bad_targetinfo") == \
        [-errno.EINVAL, -errno.EINVAL]
    assert "a REPORT needs 432" in stderr and "expected 512" in stderr
    assert int(got["report"]) == 0
    assert got["report_len"] == "432"


def test_a_failed_python_start_is_an_error_from_every_function(pal_host, tmp_path,
                                                               images):
    """cffi answers 0 from a call into an interpreter that failed to start:
    the library must not, or pal_init would look successful."""
    from skeleton.capi import build

    stdlib_only = ":".join(p for p in sys.path if p.startswith(sys.base_prefix))
    broken = build.build(2, tmp_path / "liberpal-skeleton-v2.so", path=stdlib_only)
    root = make_root(tmp_path, images / "8")
    proc = subprocess.run(
        [str(pal_host), "-l", str(broken), "-V", "2", "-r", str(root), "-b",
         "-a", "sim no-epm"], capture_output=True, text=True, timeout=HOST_TIMEOUT_S)
    got = dict(line.partition("=")[::2] for line in proc.stdout.splitlines())
    codes = {k: int(v) for k, v in got.items()
             if k.startswith("before_") or k in ("version", "init")}
    assert set(codes.values()) == {-errno.ELIBACC}
    assert "did not start" in proc.stderr


def test_launch_path_imports_neither_grpc_nor_structlog(tmp_path, images, daemon):
    """A fresh interpreter loads what the library loads, launches twice from
    the pool and the builder, and has imported neither."""
    code = f"""
import sys
from skeleton.capi import entry
entry._preload()
entry._configure_logging("info", at_load=True)
from skeleton.pal import Pal
for _ in range(2):
    pal = Pal()
    pal.init("sim epm-socket={daemon.grpc_socket}", image_dir="{images / '8'}")
    pal.destroy()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "structlog")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, timeout=HOST_TIMEOUT_S, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


def test_launches_after_load_import_nothing(tmp_path, images, daemon):
    """rune calls pal_init after pivoting into the container, where nothing
    of the host can be imported: what the library loads must cover a launch
    from the pool, a built launch and a report, without a single import."""
    code = f"""
import sys
from skeleton.capi import entry
entry._preload()
entry._configure_logging("info", at_load=True)
from skeleton.pal import Pal, TARGETINFO_SIZE, REPORT_SIZE
loaded = set(sys.modules)
for args in ("sim epm-socket={daemon.grpc_socket}",) * 2 + ("sim no-epm",):
    pal = Pal()
    pal.init(args, image_dir="{images / '8'}")
    print(pal.source)
    pal.get_local_report(bytes(TARGETINFO_SIZE), REPORT_SIZE)
    pal.destroy()
print(sorted(set(sys.modules) - loaded))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, timeout=HOST_TIMEOUT_S, cwd=REPO)

    assert out.stdout.split() == ["built", "pool", "built", "[]"], out.stderr
