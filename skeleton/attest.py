"""``skeleton-attest``: print a local REPORT of the skeleton enclave for a target.

Builds the enclave from a signed image (``--sim`` or ``SGX_MODE=SIM`` for the
simulation, the sgx backend otherwise), asks it for a REPORT meant for the
target enclave, and prints the REPORT in hex on one line, then its fields as
JSON. When the target is given as an image and the backend is sim, the
command also plays the target and says whether the MAC verifies. A target
given as an image is checked first as EINIT would check it (signature,
MRENCLAVE, masks): a report for an enclave that could never run is refused.
"""

import argparse
import json
import os
import sys

from skeleton import report
from skeleton.backends import get_backend, sim
from skeleton.errors import BackendError, SkeletonError
from skeleton.image import load_image, read_file
from skeleton.measure import measure
from skeleton.structs import REPORT, REPORT_DATA_SIZE, TARGETINFO

PROG = "skeleton-attest"
DESCRIPTION = "Print a local REPORT of the skeleton enclave for a target enclave."


def _parser():
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
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


def _targetinfo_of(directory, check=True):
    """The TARGETINFO of the enclave an image directory signs.

    With ``check``, the image is measured and its SIGSTRUCT checked as the sim
    EINIT checks it; raises SkeletonError naming the target and the reason.
    """
    image = load_image(directory)
    sig = image.sigstruct
    if check:
        try:
            sim.einit(image, measure(image.data, image.geometry), sig.attributes,
                      sig.xfrm, sig.miscselect)
        except SkeletonError as e:
            raise SkeletonError(f"--target {directory}: the target's SIGSTRUCT is "
                                f"refused: {e}") from None
    return report.targetinfo_for(sig.enclave_hash, sig.attributes, sig.xfrm,
                                 sig.miscselect)


def _read_targetinfo(path):
    data = read_file(path, TARGETINFO.size)
    if len(data) != TARGETINFO.size:
        raise SkeletonError(f"--targetinfo {path}: expected {TARGETINFO.size} "
                            f"bytes, got {len(data)}")
    return data


def run(args):
    """Print the REPORT; returns the exit code. Raises SkeletonError."""
    backend = "sim" if args.sim or os.environ.get("SGX_MODE") == "SIM" else "sgx"
    if args.secret_dir:
        # The backend reads the secret from the environment; load it here
        # first so that an error names the option.
        if backend == "sim":
            try:
                report.load_secret(args.secret_dir)
            except report.ReportError as e:
                raise SkeletonError(f"--secret-dir: {e}") from None
        os.environ[report.SECRET_DIR_ENV] = args.secret_dir
    data = _report_data(args.report_data)
    image = load_image(args.image)
    if args.targetinfo:
        targetinfo = _read_targetinfo(args.targetinfo)
    else:
        # The enclave itself as the target is checked by its own build.
        targetinfo = _targetinfo_of(args.target or args.image,
                                    check=args.target is not None)
    try:
        enclave = get_backend(backend).build(image)
    except BackendError as e:
        how = "" if backend == "sim" else " (to simulate: --sim, or SGX_MODE=SIM)"
        raise SkeletonError(f"{e}{how}") from None
    with enclave:
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
