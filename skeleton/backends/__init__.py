"""Backends that build enclaves: ``sim`` (a memfd, DESIGN §5) and ``sgx``.

A backend is chosen explicitly by name, never by falling back: a user who asked
for hardware protection must not silently get a simulation.
"""

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
        from skeleton.backends import sgx
        sgx.detect()
        return sgx
    raise BackendError(f"unknown backend {name!r}: expected one of {BACKENDS}")
