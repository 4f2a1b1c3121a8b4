"""Fixtures shared by the tests: a live daemon in a temporary directory."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
IMAGES = REPO / "build" / "images"


class Daemon:
    """An `epm` process serving sockets in a temporary directory."""

    def __init__(self, tmp_path, extra_config=""):
        self.dir = tmp_path
        self.run_dir = tmp_path / "run"
        self.grpc_socket = self.run_dir / "epm.sock"
        self.handoff_socket = self.run_dir / "epm-handoff.sock"
        self.config = tmp_path / "config.toml"
        self.config.write_text(
            f'root = "{tmp_path / "root"}"\n'
            f'db_path = "{tmp_path / "root" / "epm.db"}"\n'
            f"{extra_config}\n"
            f'[grpc]\naddress = "{self.grpc_socket}"\n')
        self.log = tmp_path / "epm.log"
        self.proc = None

    def start(self, timeout=30, preexec_fn=None):
        """Start the daemon and wait until both sockets accept.

        ``preexec_fn`` runs in the child before the daemon (to set limits).
        """
        self._log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "epm_server.main", "--config", str(self.config),
             "--log-level", "debug"],
            stdout=self._log_file, stderr=subprocess.STDOUT, cwd=REPO,
            preexec_fn=preexec_fn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"epm exited with {self.proc.returncode}:\n"
                                   + self.log.read_text())
            if self.grpc_socket.exists() and self.handoff_socket.exists():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("epm did not create its sockets in time:\n"
                           + self.log.read_text())

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Stop the daemon by its pid; return its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._log_file.close()
        return self.proc.returncode

    def events(self, name):
        """The daemon's JSON log records of event ``name``, in order."""
        found = []
        for line in self.log.read_text().splitlines():
            if f'"{name}"' in line:
                record = json.loads(line)
                if record.get("event") == name:
                    found.append(record)
        return found

    def open_fds(self):
        """The number of descriptors the daemon has open now."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@pytest.fixture
def daemon(tmp_path):
    """A running daemon, stopped after the test."""
    d = Daemon(tmp_path).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def make_daemon(tmp_path):
    """A factory for daemons with extra config text; all stopped afterwards."""
    started = []

    def make(extra_config="", subdir="d", preexec_fn=None):
        path = tmp_path / f"{subdir}{len(started)}"
        path.mkdir()
        d = Daemon(path, extra_config)
        started.append(d)
        return d.start(preexec_fn=preexec_fn)

    yield make
    for d in started:
        d.stop()


@pytest.fixture(scope="session", autouse=True)
def sim_secret_dir(tmp_path_factory):
    """Keep the sim backend's report secret (and every child's) out of /var/lib."""
    directory = tmp_path_factory.mktemp("sim-secret")
    os.environ["EPM_SIM_SECRET_DIR"] = str(directory)
    return directory


@pytest.fixture(scope="session")
def make_signed_image(tmp_path_factory):
    """A factory: a new directory with encl.bin, key.pem and encl.ss.

    The image is built from skeleton/enclave and signed with a fresh key for
    the given mmap size (``sgxsign`` options as keyword arguments).
    """
    from skeleton import build_image, sgxsign

    def make(mmap_size, **options):
        directory = tmp_path_factory.mktemp("image")
        build_image.build(directory / "encl.bin")
        sgxsign.generate_key(directory / "key.pem")
        sgxsign.sign(directory / "key.pem", directory / "encl.bin",
                     directory / "encl.ss", mmap_size=mmap_size, **options)
        return directory

    return make


@pytest.fixture(scope="session")
def images():
    """Directory of signed images, one subdirectory per size in MiB."""
    if not (IMAGES / "8" / "encl.ss").exists():
        raise RuntimeError(f"no signed images under {IMAGES}: run `make image`")
    return IMAGES
