"""A live `epm` daemon in a temporary directory, for the tests and the bench.

The tests run it at debug level (their assertions read its events); the
benchmarks at info, as a deployed daemon logs, so that debug events on the
hot path are not measured.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


class Daemon:
    """An `epm` process serving sockets in a temporary directory."""

    def __init__(self, tmp_path, extra_config="", log_level="debug"):
        self.dir = tmp_path
        self.log_level = log_level
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
        return self._launch(self.command(), timeout, preexec_fn=preexec_fn)

    def command(self):
        """The daemon's argv."""
        return [sys.executable, "-m", "epm_server.main", "--config",
                str(self.config), "--log-level", self.log_level]

    def _launch(self, argv, timeout, **popen):
        self._log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, cwd=REPO, **popen)
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
