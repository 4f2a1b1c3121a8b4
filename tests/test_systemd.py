"""The unit file passes systemd's own checks."""

import pathlib
import shutil
import subprocess
import sys

UNIT = pathlib.Path(__file__).resolve().parent.parent / "systemd" / "epm.service"


def verify(unit_text, tmp_path):
    """systemd-analyze verify on the unit, with ExecStart at this venv's epm."""
    epm = pathlib.Path(sys.executable).parent / "epm"
    assert epm.exists(), f"{epm} is not installed"
    unit = tmp_path / "epm.service"
    unit.write_text(unit_text.replace("/usr/local/bin/epm", str(epm)))
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed"
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True,
                          text=True, timeout=120)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_verify_would_catch_a_broken_unit(tmp_path):
    """The check above can fail: a unit with an unknown key does not pass."""
    broken = UNIT.read_text().replace("Type=notify", "Type=notify\nNoSuchKey=1")
    result = verify(broken, tmp_path)
    assert "NoSuchKey" in result.stderr


def test_unit_lets_the_daemon_open_the_sgx_devices():
    text = UNIT.read_text()
    assert "DeviceAllow=/dev/sgx_enclave rw" in text
    assert "DeviceAllow=/dev/sgx_provision rw" in text
    assert "Type=notify" in text and "Restart=on-failure" in text


def test_unit_asks_for_a_watchdog():
    assert "WatchdogSec=30s" in UNIT.read_text()
