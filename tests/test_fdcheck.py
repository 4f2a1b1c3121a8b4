"""What may enter the pool: the kind, seals and size of an enclave fd."""

import fcntl
import os

import pytest

from epm_server import fdcheck
from epm_server.enclave import Identity
from epm_server.errors import InvalidArgument

SIZE = 8192
IDENTITY = Identity(mrenclave=b"\1" * 32, mrsigner=b"\2" * 32, attributes=4,
                    xfrm=3, size=SIZE, backend="sim")
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


@pytest.fixture
def memfd():
    fds = []

    def make(size=SIZE, seals=SEALS):
        fd = os.memfd_create("enclave", os.MFD_ALLOW_SEALING)
        fds.append(fd)
        os.ftruncate(fd, size)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


def test_a_sealed_memfd_of_the_identitys_size_is_accepted(memfd):
    fdcheck.check_enclave_fd(memfd(), IDENTITY)


def test_a_sealed_memfd_of_another_size_is_refused(memfd):
    with pytest.raises(InvalidArgument, match="16384 bytes"):
        fdcheck.check_enclave_fd(memfd(size=2 * SIZE), IDENTITY)


def test_an_unsealed_memfd_is_refused_for_its_seals_whatever_its_size(memfd):
    """Its size could still change: it is not read before the seals."""
    with pytest.raises(InvalidArgument, match="seals"):
        fdcheck.check_enclave_fd(memfd(size=2 * SIZE, seals=0), IDENTITY)


def test_a_pipe_is_refused_by_name():
    read, write = os.pipe()
    try:
        with pytest.raises(InvalidArgument, match="a pipe"):
            fdcheck.check_enclave_fd(read, IDENTITY)
    finally:
        os.close(read)
        os.close(write)
