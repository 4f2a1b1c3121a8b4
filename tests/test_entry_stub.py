"""The enclave's entry stub and its two ECALLs, run as hardware would enter them.

No machine here has SGX, so a C program (tests/host/eenter_stub.c) plays the
CPU: it enters the image at OENTRY with the registers EENTER sets, and
answers the stub's ENCLU instructions (EREPORT and EEXIT) from a fault
handler. This checks the stub's convention, its stack switch, the body's
EREPORT operands and the copies in and out; it cannot check what only the
hardware does (EREPORT's MAC, the enclave's isolation).
"""

import json
import pathlib
import shutil
import subprocess

import pytest

from skeleton import build_image
from skeleton.enclave import (REPORT_CALL_REPORT, REPORT_CALL_REPORT_DATA,
                              REPORT_CALL_SIZE)

HARNESS = pathlib.Path(__file__).parent / "host" / "eenter_stub.c"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Build the image and the harness; returns run(op, stdin) -> its JSON."""
    if not shutil.which("gcc"):
        pytest.skip("needs gcc")
    directory = tmp_path_factory.mktemp("stub")
    build_image.build(directory / "encl.bin")
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(directory / "harness"),
                    str(HARNESS)], check=True)

    def run(op, stdin=b""):
        done = subprocess.run([str(directory / "harness"),
                               str(directory / "encl.bin"), str(op)],
                              input=stdin, capture_output=True, check=True,
                              timeout=30)
        return json.loads(done.stdout)

    return run


def test_ecall_0_writes_the_greeting_and_exits_by_eexit(run):
    seen = run(0)

    buffer = bytes.fromhex(seen["buffer"])
    assert buffer.split(b"\0")[0] == b"Hello Inclavare Containers!"
    assert (seen["ereports"], seen["eexits"], seen["other"]) == (0, 1, 0)


def test_eexit_returns_to_rcx_on_the_hosts_stack_with_registers_scrubbed(run):
    seen = run(0)

    assert seen["exit_to_landing"] and seen["exit_rsp_is_host_rsp"]
    assert seen["scrubbed"]


def test_ecall_1_runs_ereport_on_aligned_copies_inside_the_enclave(run):
    targetinfo = bytes(range(32)) + bytes(480)
    report_data = bytes(range(100, 164))

    seen = run(1, targetinfo + report_data)

    assert (seen["ereports"], seen["eexits"], seen["other"]) == (1, 1, 0)
    assert seen["operands_in_enclave"] and seen["operands_aligned"]
    assert seen["body_stack_in_enclave"]
    buffer = bytes.fromhex(seen["buffer"])
    assert len(buffer) == REPORT_CALL_SIZE
    assert buffer[REPORT_CALL_REPORT_DATA:REPORT_CALL_REPORT] == report_data
    report = buffer[REPORT_CALL_REPORT:]
    assert report[64:96] == targetinfo[:32]    # REPORT.MRENCLAVE as the stand-in wrote it
    assert report[320:384] == report_data      # REPORT.REPORTDATA
    assert seen["scrubbed"] and seen["exit_rsp_is_host_rsp"]
