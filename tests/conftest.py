"""Fixtures shared by the tests: a live daemon in a temporary directory."""

import os

# Tests fork workloads (skeleton.pal) in a process that also runs gRPC
# clients. gRPC's fork handlers, on when this is unset, can deadlock in the
# fork itself (grpc/grpc#22624); the forked children never use gRPC. Set
# before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest  # noqa: E402

# Tests import REPO and Daemon from here.
from live_daemon import REPO, Daemon  # noqa: F401

IMAGES = REPO / "build" / "images"


@pytest.fixture
def daemon(tmp_path):
    """A running daemon, stopped after the test."""
    d = Daemon(tmp_path).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def make_daemon(tmp_path):
    """A factory for daemons with extra config text; all stopped afterwards."""
    started = []

    def make(extra_config="", subdir="d", preexec_fn=None):
        path = tmp_path / f"{subdir}{len(started)}"
        path.mkdir()
        d = Daemon(path, extra_config)
        started.append(d)
        return d.start(preexec_fn=preexec_fn)

    yield make
    for d in started:
        d.stop()


@pytest.fixture(scope="session", autouse=True)
def sim_secret_dir(tmp_path_factory):
    """Keep the sim backend's report secret (and every child's) out of /var/lib."""
    directory = tmp_path_factory.mktemp("sim-secret")
    os.environ["EPM_SIM_SECRET_DIR"] = str(directory)
    return directory


@pytest.fixture(scope="session")
def make_signed_image(tmp_path_factory):
    """A factory: a new directory with encl.bin, key.pem and encl.ss.

    The image is built from skeleton/enclave and signed with a fresh key for
    the given mmap size (``sgxsign`` options as keyword arguments).
    """
    from skeleton import build_image, sgxsign

    def make(mmap_size, **options):
        directory = tmp_path_factory.mktemp("image")
        build_image.build(directory / "encl.bin")
        sgxsign.generate_key(directory / "key.pem")
        sgxsign.sign(directory / "key.pem", directory / "encl.bin",
                     directory / "encl.ss", mmap_size=mmap_size, **options)
        return directory

    return make


@pytest.fixture(scope="session")
def sign_copy(tmp_path_factory):
    """A factory: a copy of a signed image directory's encl.bin, signed with
    the same key for another mmap size (another enclave, same MRSIGNER)."""
    import shutil

    from skeleton import sgxsign

    def make(signed, mmap_size):
        directory = tmp_path_factory.mktemp("copy")
        shutil.copy(signed / "encl.bin", directory / "encl.bin")
        sgxsign.sign(signed / "key.pem", directory / "encl.bin",
                     directory / "encl.ss", mmap_size=mmap_size)
        return directory

    return make


@pytest.fixture(scope="session")
def images():
    """Directory of signed images, one subdirectory per size in MiB."""
    if not (IMAGES / "8" / "encl.ss").exists():
        raise RuntimeError(f"no signed images under {IMAGES}: run `make image`")
    return IMAGES
