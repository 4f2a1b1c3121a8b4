"""``skeleton-attest``: print a local REPORT of the skeleton enclave for a target.

Builds the enclave from a signed image (``--sim`` or ``SGX_MODE=SIM`` for the
simulation, the sgx backend otherwise), asks it for a REPORT meant for the
target enclave, and prints the REPORT in hex on one line, then its fields as
JSON. When the target is given as an image and the backend is sim, the
command also plays the target and says whether the MAC verifies.
"""

import argparse
import json
import os
import pathlib
import sys

from skeleton import report
from skeleton.backends import get_backend
from skeleton.errors import SkeletonError
from skeleton.image import load_image
from skeleton.structs import REPORT, REPORT_DATA_SIZE

PROG = "skeleton-attest"


def _parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--image", default=".", metavar="DIR",
                   help="directory of encl.bin and encl.ss (default: .)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target", metavar="DIR",
                        help="signed image of the target enclave (default: the "
                             "enclave itself)")
    target.add_argument("--targetinfo", metavar="FILE",
                        help="a raw 512-byte TARGETINFO")
    p.add_argument("--report-data", default="", metavar="HEX",
                   help=f"up to {REPORT_DATA_SIZE} bytes, zero-padded")
    p.add_argument("--sim", action="store_true", help="use the sim backend")
    p.add_argument("--secret-dir", metavar="DIR",
                   help=f"sim secret directory (default ${report.SECRET_DIR_ENV} "
                        f"or {report.DEFAULT_SECRET_DIR})")
    return p


def _report_data(text):
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise SkeletonError(f"--report-data {text!r} is not hex") from None
    if len(data) > REPORT_DATA_SIZE:
        raise SkeletonError(f"--report-data is {len(data)} bytes, at most "
                            f"{REPORT_DATA_SIZE}")
    return data.ljust(REPORT_DATA_SIZE, b"\0")


def _targetinfo_of(directory):
    sig = load_image(directory).sigstruct
    return report.targetinfo_for(sig.enclave_hash, sig.attributes, sig.xfrm,
                                 sig.miscselect)


def run(args):
    """Print the REPORT; returns the exit code. Raises SkeletonError."""
    if args.secret_dir:
        os.environ[report.SECRET_DIR_ENV] = args.secret_dir
    data = _report_data(args.report_data)
    image = load_image(args.image)
    backend = "sim" if args.sim or os.environ.get("SGX_MODE") == "SIM" else "sgx"
    if args.targetinfo:
        targetinfo = pathlib.Path(args.targetinfo).read_bytes()
    else:
        targetinfo = _targetinfo_of(args.target or args.image)
    with get_backend(backend).build(image) as enclave:
        raw = enclave.report(targetinfo, data)
    fields = report.to_json(REPORT.unpack(raw))
    fields["backend"] = backend
    if backend == "sim" and not args.targetinfo:
        try:
            report.verify_report(report.load_secret(), raw, targetinfo)
            fields["verified_by_target"] = True
        except report.ReportError:
            fields["verified_by_target"] = False
    print(raw.hex())
    print(json.dumps(fields, indent=2))
    return 0 if fields.get("verified_by_target", True) else 1


def main(argv=None):
    """Entry point of the ``skeleton-attest`` console script."""
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except SkeletonError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
    except OSError as e:
        print(f"{PROG}: {e.filename}: {e.strerror}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
