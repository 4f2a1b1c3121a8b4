"""The DaemonSet manifest passes the Kubernetes schema and says what it must."""

import pathlib

import kubernetes_validate
import pytest
import yaml

MANIFEST = (pathlib.Path(__file__).resolve().parent.parent / "deploy"
            / "kubernetes" / "epm-daemonset.yaml")


def documents():
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: d["kind"])
def test_manifest_passes_strict_schema_validation(doc):
    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_a_broken_manifest_is_caught():
    [_, daemonset] = documents()
    daemonset["spec"]["template"]["spec"]["containers"][0]["ports"] = "9464"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, "1.30", strict=True)


def test_runs_on_sgx_nodes_with_the_host_socket_dir_and_health_probes():
    [_, daemonset] = documents()
    pod = daemonset["spec"]["template"]["spec"]
    [term] = pod["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert "sgx" in term["matchExpressions"][0]["key"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["sgx.intel.com/enclave"] == 1
    assert container["ports"][0]["containerPort"] == 9464
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["epmctl", "health"]
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert "/var/run/epm" in host_paths
