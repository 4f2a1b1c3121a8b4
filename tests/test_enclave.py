"""Mapping an enclave: in another process from a passed fd, never over a mapping."""

import json
import os
import socket
import subprocess
import sys

import pytest

from skeleton.backends import sim
from skeleton.enclave import Enclave, release
from skeleton.errors import MappingConflict
from skeleton.image import load_image

PAGE = 4096
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The receiving process: take the fd from the socket, adopt and map it at the
# layout's addresses, report what it sees, then write a marker for the parent.
CHILD = r"""
import json, socket, sys
from epm_client.types import Identity, LayoutEntry
from skeleton.enclave import Enclave, ffi
spec = json.loads(sys.argv[1])
sock = socket.socket(fileno=int(sys.argv[2]))
_, fds, _, _ = socket.recv_fds(sock, 1, 1)
layout = [LayoutEntry(**e) for e in spec["layout"]]
identity = Identity(**{**spec["identity"], "mrenclave": b"", "mrsigner": b""})
with Enclave.adopt(fds[0], layout, identity) as enclave:
    enclave.map()
    probe = ffi.buffer(ffi.cast("char *", spec["probe"]), 32)
    seen = bytes(probe).hex()
    probe[0:6] = b"child!"
    print(json.dumps({"greeting": enclave.ecall(0), "seen": seen,
                      "base": enclave.base}))
"""


@pytest.fixture(scope="module")
def image(make_signed_image):
    return load_image(make_signed_image(1 << 20))


def _mapped(addr):
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= addr < end:
                return True
    return False


def test_second_process_maps_the_same_memory(image):
    with sim.build(image) as enclave:
        probe = enclave.layout[1].addr + 3 * PAGE
        pattern = os.urandom(32)
        os.pwrite(enclave.fd, pattern, probe - enclave.base)
        spec = {"layout": [e._asdict() for e in enclave.layout], "probe": probe,
                "identity": {**enclave.identity._asdict(), "mrenclave": "",
                             "mrsigner": ""}}
        parent, child = socket.socketpair()
        with parent, child:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(spec), str(child.fileno())],
                pass_fds=[child.fileno()], stdout=subprocess.PIPE, cwd=REPO)
            socket.send_fds(parent, [b"\0"], [enclave.fd])
            out, _ = proc.communicate(timeout=60)

        assert proc.returncode == 0
        seen = json.loads(out)
        assert seen["greeting"] == "Hello Inclavare Containers!"
        assert seen["base"] == enclave.base
        assert bytes.fromhex(seen["seen"]) == pattern
        assert os.pread(enclave.fd, 6, probe - enclave.base) == b"child!"


def test_conflicting_mapping_raises_and_leaves_it_intact(image):
    with sim.build(image) as enclave:
        before = os.pread(enclave.fd, PAGE, enclave.layout[1].addr - enclave.base)
        other = Enclave.adopt(os.dup(enclave.fd), enclave.layout, enclave.identity)
        with other:
            with pytest.raises(MappingConflict, match=hex(enclave.layout[0].addr)):
                other.map()

        assert enclave.ecall(0) == "Hello Inclavare Containers!"
        assert os.pread(enclave.fd, PAGE, enclave.layout[1].addr - enclave.base) \
            == before


def test_partial_conflict_undoes_what_was_mapped(image):
    """The TCS page is free but the rest is taken: nothing stays mapped."""
    with sim.build(image) as enclave:
        tcs = enclave.layout[0]
        release(tcs.addr, tcs.size)
        other = Enclave.adopt(os.dup(enclave.fd), enclave.layout, enclave.identity)
        with other:
            with pytest.raises(MappingConflict, match=hex(enclave.layout[1].addr)):
                other.map()
            assert not other.mapped

        assert not _mapped(tcs.addr)
        assert _mapped(enclave.layout[1].addr)


def test_close_unmaps_and_is_idempotent(image):
    enclave = sim.build(image)
    base, fd = enclave.base, enclave.fd

    enclave.close()
    enclave.close()

    assert not _mapped(base)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_adopted_enclave_finds_its_base_from_the_layout(image):
    with sim.build(image) as enclave:
        adopted = Enclave.adopt(os.dup(enclave.fd), enclave.layout, enclave.identity)
        assert adopted.base == enclave.base
        adopted.close()
