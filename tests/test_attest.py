"""skeleton-attest: what it checks of the target, its inputs and its messages."""

import json
import os
import shutil

import pytest

from skeleton import attest, report


@pytest.fixture(scope="module")
def signed(make_signed_image):
    return make_signed_image(1 << 20)


@pytest.fixture(scope="module")
def target(signed, sign_copy):
    """Another enclave, signed by the same key."""
    return sign_copy(signed, 2 << 20)


@pytest.fixture
def secret_env(monkeypatch):
    """attest sets $EPM_SIM_SECRET_DIR for its backend: restore it afterwards."""
    monkeypatch.setenv(report.SECRET_DIR_ENV, os.environ[report.SECRET_DIR_ENV])


def _tampered(directory, tmp_path, offset):
    copy = tmp_path / "tampered"
    shutil.copytree(directory, copy)
    sigstruct = bytearray((copy / "encl.ss").read_bytes())
    sigstruct[offset] ^= 1
    (copy / "encl.ss").write_bytes(sigstruct)
    return copy


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        attest.main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    assert "Print a local REPORT of the skeleton enclave" in out


def test_a_target_whose_signature_is_altered_is_refused(signed, target, tmp_path,
                                                       capsys):
    bad = _tampered(target, tmp_path, 600)  # a byte of the signature

    code = attest.main(["--image", str(signed), "--target", str(bad), "--sim"])

    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err == (f"skeleton-attest: --target {bad}: the target's SIGSTRUCT is "
                   "refused: SIGSTRUCT signature does not verify with its "
                   "modulus\n")


def test_a_target_whose_mrenclave_is_altered_is_refused(signed, target, tmp_path,
                                                       capsys):
    bad = _tampered(target, tmp_path, 960)
    assert attest.main(["--image", str(signed), "--target", str(bad), "--sim"]) == 1
    assert "the target's SIGSTRUCT is refused" in capsys.readouterr().err


def test_a_good_target_still_verifies(signed, target, capsys):
    assert attest.main(["--image", str(signed), "--target", str(target),
                        "--sim"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads("\n".join(out[1:]))["verified_by_target"] is True


def test_a_device_as_targetinfo_is_refused_at_once(signed, capsys):
    code = attest.main(["--image", str(signed), "--targetinfo", "/dev/zero",
                        "--sim"])
    assert code == 1
    assert capsys.readouterr().err == ("skeleton-attest: /dev/zero: not a regular "
                                       "file\n")


@pytest.mark.parametrize("size, message", [
    (100, "expected 512 bytes, got 100"),
    (513, "too large (513 bytes, at most 512)"),
])
def test_a_targetinfo_of_another_size_is_refused(signed, tmp_path, capsys, size,
                                                 message):
    (tmp_path / "ti").write_bytes(bytes(size))
    code = attest.main(["--image", str(signed), "--targetinfo",
                        str(tmp_path / "ti"), "--sim"])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_secret_dir_error_names_the_option(signed, tmp_path, capsys, secret_env):
    (tmp_path / "file").write_text("")
    directory = tmp_path / "file" / "secret"

    code = attest.main(["--image", str(signed), "--sim", "--secret-dir",
                        str(directory)])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"skeleton-attest: --secret-dir: {directory}: cannot "
                          "create")
    assert report.SECRET_DIR_ENV not in err


def test_a_world_writable_secret_dir_is_refused(signed, tmp_path, capsys,
                                                secret_env):
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)

    code = attest.main(["--image", str(signed), "--sim", "--secret-dir",
                        str(directory)])

    assert code == 1
    assert capsys.readouterr().err == (
        f"skeleton-attest: --secret-dir: {directory}: mode 777 lets others "
        "replace the report secret; expected a directory only its owner can "
        "write, such as 700\n")
    assert not (directory / report.SECRET_NAME).exists()


def test_without_the_device_the_error_says_how_to_simulate(signed, capsys,
                                                           monkeypatch):
    if os.path.exists("/dev/sgx_enclave"):
        pytest.skip("this host has an SGX device")
    monkeypatch.delenv("SGX_MODE", raising=False)
    assert attest.main(["--image", str(signed)]) == 1
    assert "(to simulate: --sim, or SGX_MODE=SIM)" in capsys.readouterr().err
