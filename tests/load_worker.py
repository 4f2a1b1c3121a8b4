"""One client process of the load tests and the soak script.

    load_worker.py GRPC_SOCKET CLAIMS_DIR CYCLES SECONDS SEED

Each cycle checks an enclave out of the pool (or builds one when the pool is
empty, writing a fresh tag at the start of its memory), proves it is the only
holder of that tag by creating ``CLAIMS_DIR/<tag>`` with O_EXCL, checks it
back in, drops the claim and saves it final. Some cycles end otherwise, as
containers do: the enclave is closed without a check-in, or checked in and
never saved. The worker stops after CYCLES cycles or SECONDS seconds,
whichever comes first, and prints one JSON object with what it saw; an
"errors" list that is not empty means the pool broke a promise.
"""

import fcntl
import json
import mmap
import os
import random
import sys
import time
import uuid

from epm_client import errors
from epm_client.client import Client
from epm_client.types import Identity, LayoutEntry

SUBTYPE = "load-0.0.0"
SIZE = 8192
TAG_SIZE = 32
IDENTITY = Identity(mrenclave=b"\x5a" * 32, mrsigner=b"\xa5" * 32, attributes=4,
                    xfrm=3, size=SIZE, backend="sim")
LAYOUT = [LayoutEntry(addr=0x7000_0000, size=SIZE)]
_F_ADD_SEALS = 1033
_SEALS = 0x2 | 0x4


def build():
    """A new sealed enclave memfd whose memory starts with a fresh tag."""
    fd = os.memfd_create("load-enclave", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    tag = uuid.uuid4().hex
    os.pwrite(fd, tag.encode(), 0)
    fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
    return fd, tag


def read_tag(fd):
    with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as mem:
        return mem[:TAG_SIZE].decode("ascii", "replace")


def run(grpc_socket, claims, cycles, seconds, seed):
    rng = random.Random(seed)
    seen = {"checked_out": [], "built": [], "checked_in": [], "unsaved": [],
            "dropped": 0, "refused": 0, "cycles": 0, "errors": []}
    client = Client(grpc_socket)
    deadline = time.monotonic() + seconds
    try:
        while seen["cycles"] < cycles and time.monotonic() < deadline:
            seen["cycles"] += 1
            _cycle(client, claims, rng, seen)
    except errors.EpmError as e:
        seen["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        client.close()
    return seen


def _cycle(client, claims, rng, seen):
    got = client.check_out(SUBTYPE, IDENTITY)
    if got is None:
        fd, tag = build()
        seen["built"].append(tag)
    else:
        fd, tag = got.fd, read_tag(got.fd)
        seen["checked_out"].append([got.pool_id, tag])
    claim = os.path.join(claims, tag)
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        seen["errors"].append(f"tag {tag} handed out while another holds it")
        os.close(fd)
        return
    try:
        roll = rng.random()
        if roll < 0.05:
            seen["dropped"] += 1  # the container ends without a check-in
            return
        try:
            pool_id = client.check_in(fd, SUBTYPE, LAYOUT, IDENTITY)
        except errors.ResourceExhausted:
            seen["refused"] += 1
            return
        if roll < 0.08:
            seen["unsaved"].append(pool_id)  # its owner never saves it
            return
        seen["checked_in"].append(pool_id)
        os.unlink(claim)
        claim = None
        client.save_final(pool_id)
    finally:
        if claim is not None:
            os.unlink(claim)
        os.close(fd)


def main(argv):
    grpc_socket, claims, cycles, seconds, seed = argv
    seen = run(grpc_socket, claims, int(cycles), float(seconds), int(seed))
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
