"""An `epm` daemon for the benchmarks, in a temporary directory.

Unlike the tests' daemon it logs at the daemon's default level (info), as a
deployed one does: debug events on the hot path would be measured too.
"""

import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


class Daemon:
    """An `epm` process serving sockets under ``directory``; stop by its pid."""

    def __init__(self, directory, extra_config="", log_level="info"):
        self.dir = pathlib.Path(directory)
        self.grpc_socket = self.dir / "run" / "epm.sock"
        self.handoff_socket = self.dir / "run" / "epm-handoff.sock"
        self.config = self.dir / "config.toml"
        self.log = self.dir / "epm.log"
        self.log_level = log_level
        self.proc = None
        self.config.write_text(
            f'root = "{self.dir / "root"}"\n'
            f'db_path = "{self.dir / "root" / "epm.db"}"\n'
            f"{extra_config}\n"
            f'[grpc]\naddress = "{self.grpc_socket}"\n')

    def start(self, timeout=30):
        """Start the daemon and wait until both sockets exist."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "epm_server.main", "--config",
                 str(self.config), "--log-level", self.log_level],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
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

    def stop(self, timeout=30):
        """SIGTERM the daemon by its pid (SIGKILL if it lingers); its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
