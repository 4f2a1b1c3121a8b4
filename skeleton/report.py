"""Local attestation: the REPORT that EREPORT writes, and its check by the target.

Layouts are SDM Vol. 3D, 34.17 (TARGETINFO) and 34.18 (REPORT). On hardware
the CPU MACs the REPORT with a key that only the target enclave can obtain
(EGETKEY). The sim backend plays the CPU: the MAC is an AES-128-CMAC under a
key derived from a per-host secret and the target's identity, and
``verify_report`` plays the target enclave. Anyone who can read the secret
file can forge a report, which is why it is created 0600 and why sim reports
prove nothing to a remote party.
"""

import functools
import hashlib
import hmac
import os

from skeleton import openssl
from skeleton.errors import SkeletonError
from skeleton.structs import (REPORT, REPORT_BODY_SIZE, REPORT_DATA_SIZE,
                              TARGETINFO)

SECRET_DIR_ENV = "EPM_SIM_SECRET_DIR"
DEFAULT_SECRET_DIR = "/var/lib/epm"
SECRET_NAME = "sim-report-secret"
SECRET_SIZE = 16  # an AES-128 key
_KEY_LABEL = b"epm sim REPORT key\0"
_KEYID_LABEL = b"epm sim REPORT keyid\0"


class ReportError(SkeletonError):
    """A TARGETINFO, report data or REPORT is malformed, or a REPORT fails its MAC."""


def secret_dir(directory=None):
    """The directory of the simulated secret: the argument, $EPM_SIM_SECRET_DIR,
    or /var/lib/epm."""
    return os.fspath(directory or os.environ.get(SECRET_DIR_ENV)
                     or DEFAULT_SECRET_DIR)


def load_secret(directory=None):
    """This host's simulated CPU secret, created (0600) on first use.

    Raises ReportError when it cannot be read or created, when its file is
    readable by others (any reader could forge reports), or when its
    directory is writable by others (any writer could replace the secret
    with one they know). A directory given as the argument is the caller's
    to name in its message; one from the environment or the default is named
    here.
    """
    if directory:
        origin = ""
    elif os.environ.get(SECRET_DIR_ENV):
        origin = f" (the directory is ${SECRET_DIR_ENV})"
    else:
        origin = f" (set ${SECRET_DIR_ENV} to use another directory)"
    return _load_secret(os.path.realpath(secret_dir(directory)), origin)


@functools.cache
def _load_secret(directory, origin):
    path = os.path.join(directory, SECRET_NAME)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        mode = os.stat(directory).st_mode
    except OSError as e:
        raise ReportError(f"{directory}: cannot create the simulated report "
                          f"secret's directory: {e.strerror}{origin}") from None
    if mode & 0o022:
        raise ReportError(f"{directory}: mode {mode & 0o7777:o} lets others replace "
                          "the report secret; expected a directory only its owner "
                          f"can write, such as 700{origin}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise ReportError(f"{path}: cannot create the simulated report secret: "
                          f"{e.strerror}{origin}") from None
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(SECRET_SIZE))
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read(SECRET_SIZE + 1)
    except OSError as e:
        raise ReportError(f"{path}: cannot read the simulated report secret: "
                          f"{e.strerror}{origin}") from None
    if mode & 0o077:
        raise ReportError(f"{path}: mode {mode & 0o777:o} lets others read the "
                          f"report secret; expected 600{origin}")
    if len(secret) != SECRET_SIZE:
        raise ReportError(f"{path}: expected {SECRET_SIZE} bytes, got "
                          f"{len(secret) if len(secret) <= SECRET_SIZE else 'more'}")
    return secret


def keyid(secret):
    """The KEYID this host puts in its reports (per host, as hardware's is per boot)."""
    return hashlib.sha256(_KEYID_LABEL + secret).digest()


def report_key(secret, targetinfo, key_id):
    """The REPORT key of a target (TARGETINFO bytes): what EGETKEY would give it.

    Derived from the target's MRENCLAVE, attributes, XFRM and MISCSELECT, and
    the KEYID, so that only that enclave's verifier gets the same key.
    """
    t = TARGETINFO.unpack(targetinfo)
    dependencies = (_KEY_LABEL + key_id + t.mrenclave
                    + t.attributes.to_bytes(8, "little") + t.xfrm.to_bytes(8, "little")
                    + t.miscselect.to_bytes(4, "little"))
    return openssl.aes_cmac(secret, dependencies)


def targetinfo_for(mrenclave, attributes, xfrm, miscselect=0):
    """The TARGETINFO naming an enclave as the target of a report."""
    return TARGETINFO.pack(mrenclave=mrenclave, attributes=attributes, xfrm=xfrm,
                           miscselect=miscselect)


def check_sizes(targetinfo, report_data):
    """Raise ReportError unless the inputs of EREPORT have their sizes."""
    if len(targetinfo) != TARGETINFO.size:
        raise ReportError(f"TARGETINFO must be {TARGETINFO.size} bytes, got "
                          f"{len(targetinfo)}")
    if len(report_data) != REPORT_DATA_SIZE:
        raise ReportError(f"report data must be {REPORT_DATA_SIZE} bytes, got "
                          f"{len(report_data)}")


def ereport(secret, targetinfo, report_data, *, mrenclave, mrsigner, attributes,
            xfrm, isvprodid, isvsvn, miscselect=0):
    """The 432-byte REPORT of an enclave for a target, as EREPORT writes it."""
    check_sizes(targetinfo, report_data)
    key_id = keyid(secret)
    report = bytearray(REPORT.pack(
        miscselect=miscselect, attributes=attributes, xfrm=xfrm,
        mrenclave=mrenclave, mrsigner=mrsigner, isvprodid=isvprodid,
        isvsvn=isvsvn, report_data=bytes(report_data), keyid=key_id))
    key = report_key(secret, bytes(targetinfo), key_id)
    REPORT.set(report, "mac", openssl.aes_cmac(key, bytes(report[:REPORT_BODY_SIZE])))
    return bytes(report)


def verify_report(secret, report, targetinfo):
    """Check a REPORT as its target enclave would, with the target's TARGETINFO.

    Returns the REPORT record; raises ReportError when the REPORT is malformed
    or its MAC does not verify (another target, or altered bytes).
    """
    if len(report) != REPORT.size:
        raise ReportError(f"a REPORT is {REPORT.size} bytes, got {len(report)}")
    if len(targetinfo) != TARGETINFO.size:
        raise ReportError(f"TARGETINFO must be {TARGETINFO.size} bytes, got "
                          f"{len(targetinfo)}")
    record = REPORT.unpack(bytes(report))
    key = report_key(secret, bytes(targetinfo), record.keyid)
    expected = openssl.aes_cmac(key, bytes(report[:REPORT_BODY_SIZE]))
    if not hmac.compare_digest(expected, record.mac):
        raise ReportError("REPORT MAC does not verify for this target: it was "
                          "made for another enclave or altered")
    return record


def to_json(record):
    """A REPORT record as a JSON-ready dict: bytes in hex, integers as numbers."""
    return {field: value.hex() if isinstance(value, bytes) else value
            for field, value in record._asdict().items()}
