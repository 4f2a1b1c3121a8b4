"""Local reports: EREPORT's layout, the sim MAC, and the target's check."""

import json
import os

import pytest

from skeleton import attest, report
from skeleton.backends import sim
from skeleton.errors import SkeletonError
from skeleton.image import load_image
from skeleton.report import ReportError
from skeleton.structs import REPORT


@pytest.fixture(autouse=True)
def secret_dir(tmp_path, monkeypatch):
    directory = tmp_path / "secret"
    monkeypatch.setenv(report.SECRET_DIR_ENV, str(directory))
    return directory


@pytest.fixture(scope="module")
def signed(make_signed_image):
    return make_signed_image(1 << 20)


@pytest.fixture(scope="module")
def other(signed, sign_copy):
    """A second image, a different enclave signed by the same key."""
    return sign_copy(signed, 2 << 20)


def _targetinfo(directory):
    sig = load_image(directory).sigstruct
    return report.targetinfo_for(sig.enclave_hash, sig.attributes, sig.xfrm)


def test_report_has_the_sdm_layout(signed, other):
    image = load_image(signed)
    data = os.urandom(64)
    with sim.build(image) as enclave:
        raw = enclave.report(_targetinfo(other), data)

    assert len(raw) == 432
    assert raw[64:96] == image.sigstruct.enclave_hash
    assert raw[128:160] == image.mrsigner
    assert int.from_bytes(raw[48:56], "little") == 0x4
    assert int.from_bytes(raw[56:64], "little") == 0x3
    assert raw[256:260] == bytes(4)  # isvprodid, isvsvn as signed
    assert raw[320:384] == data


def test_report_is_verified_by_its_target(signed, other, secret_dir):
    with sim.build(load_image(signed)) as enclave:
        raw = enclave.report(_targetinfo(other), bytes(range(64)))

    record = report.verify_report(report.load_secret(), raw, _targetinfo(other))

    assert record.report_data == bytes(range(64))
    assert (secret_dir / report.SECRET_NAME).stat().st_mode & 0o777 == 0o600


def test_report_is_rejected_by_another_target(signed, other):
    with sim.build(load_image(signed)) as enclave:
        raw = enclave.report(_targetinfo(other), bytes(64))

    with pytest.raises(ReportError, match="MAC does not verify for this target"):
        report.verify_report(report.load_secret(), raw, _targetinfo(signed))


@pytest.mark.parametrize("bit", [0, 64 * 8 + 3, 320 * 8, 383 * 8 + 7, 390 * 8,
                                 416 * 8 + 1])
def test_a_single_flipped_bit_is_rejected(signed, other, bit):
    with sim.build(load_image(signed)) as enclave:
        raw = bytearray(enclave.report(_targetinfo(other), bytes(64)))
    raw[bit // 8] ^= 1 << (bit % 8)

    with pytest.raises(ReportError, match="MAC does not verify"):
        report.verify_report(report.load_secret(), bytes(raw), _targetinfo(other))


def test_another_hosts_secret_does_not_verify(signed, other, tmp_path):
    with sim.build(load_image(signed)) as enclave:
        raw = enclave.report(_targetinfo(other), bytes(64))

    with pytest.raises(ReportError):
        report.verify_report(report.load_secret(tmp_path / "elsewhere"), raw,
                             _targetinfo(other))


@pytest.mark.parametrize("targetinfo, data, message", [
    (bytes(511), bytes(64), "TARGETINFO must be 512 bytes, got 511"),
    (bytes(512), bytes(63), "report data must be 64 bytes, got 63"),
])
def test_bad_sizes_are_refused(signed, targetinfo, data, message):
    with sim.build(load_image(signed)) as enclave:
        with pytest.raises(ReportError, match=message) as info:
            enclave.report(targetinfo, data)
    assert isinstance(info.value, SkeletonError)


def test_an_adopted_enclave_without_its_sigstruct_cannot_report(signed):
    with sim.build(load_image(signed)) as enclave:
        adopted = sim.Enclave.adopt(os.dup(enclave.fd), enclave.layout,
                                    enclave.identity)
        with adopted, pytest.raises(ReportError, match="SIGSTRUCT is unknown"):
            adopted.report(bytes(512), bytes(64))


def test_a_secret_readable_by_others_is_refused(tmp_path):
    directory = tmp_path / "loose"
    report.load_secret(directory)
    (directory / report.SECRET_NAME).chmod(0o644)
    report._load_secret.cache_clear()
    with pytest.raises(ReportError, match="mode 644 lets others read"):
        report.load_secret(directory)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_secret_dir_writable_by_others_is_refused(tmp_path, mode):
    """A writer could put a secret it knows in place of ours."""
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(ReportError, match=f"mode {mode:o} lets others replace the "
                                          "report secret"):
        report.load_secret(directory)


def test_a_secret_dir_from_the_environment_is_named_in_errors(tmp_path,
                                                              monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(report.SECRET_DIR_ENV, str(tmp_path / "file" / "d"))
    with pytest.raises(ReportError, match=r"\(the directory is \$EPM_SIM_SECRET_DIR\)"):
        report.load_secret()


def test_attest_prints_hex_and_json(signed, other, capsys):
    code = attest.main(["--image", str(signed), "--target", str(other),
                        "--report-data", "cafe", "--sim"])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    raw = bytes.fromhex(out[0])
    fields = json.loads("\n".join(out[1:]))
    assert REPORT.unpack(raw).report_data == bytes.fromhex("cafe") + bytes(62)
    assert fields["mrenclave"] == load_image(signed).sigstruct.enclave_hash.hex()
    assert fields["report_data"].startswith("cafe")
    assert fields["verified_by_target"] is True


def test_attest_refuses_hardware_without_the_device(signed, capsys, monkeypatch):
    monkeypatch.delenv("SGX_MODE", raising=False)
    code = attest.main(["--image", str(signed)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("skeleton-attest: ") and err.count("\n") == 1
