"""The soak script, bounded for CI (EPM_SOAK_SECONDS to run longer)."""

import json
import os
import subprocess
import sys

from conftest import REPO

SECONDS = os.environ.get("EPM_SOAK_SECONDS", "10")


def test_soak_reports_no_error_and_no_growth():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "soak.py"), "--seconds", SECONDS,
         "--clients", "4"],
        capture_output=True, text=True, timeout=float(SECONDS) + 120, cwd=REPO)

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == []
    assert report["operations"]["cycles"] > 0
    assert report["fds"]["growth"] == 0
