"""Backends that build enclaves: ``sim`` (a memfd, DESIGN §5) and ``sgx``.

A backend is chosen explicitly by name, never by falling back: a user who asked
for hardware protection must not silently get a simulation.
"""

import os

from skeleton.errors import BackendError

BACKENDS = ("sim", "sgx")
SGX_DEVICE = "/dev/sgx_enclave"


def get_backend(name):
    """The backend module for a name; it provides ``build(image) -> Enclave``.

    Raises BackendError for an unknown name or a backend this host cannot run.
    """
    if name == "sim":
        from skeleton.backends import sim
        return sim
    if name == "sgx":
        if not os.path.exists(SGX_DEVICE):
            raise BackendError(f"the sgx backend needs {SGX_DEVICE}, not found on "
                               "this host; ask for the sim backend to simulate")
        # The in-tree driver backend (DESIGN §5) is the subject of a later issue.
        raise BackendError("the sgx backend is not implemented yet")
    raise BackendError(f"unknown backend {name!r}: expected one of {BACKENDS}")
