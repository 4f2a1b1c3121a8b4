"""The benchmark suite, run at its tiny scale: it works and writes every figure.

No timing is asserted here; the figures belong to `make bench`.
"""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
SIZES = {"8", "32", "64", "80"}


def test_tiny_run_writes_every_figure_and_the_table(tmp_path, images):
    out, table = tmp_path / "results.json", tmp_path / "results.md"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--tiny",
                    "--images", str(images), "--out", str(out), "--table", str(table)],
                   check=True, capture_output=True, timeout=240, cwd=REPO)
    r = json.loads(out.read_text())

    for key in ("launch_build_ms", "launch_pool_ms", "launch_pool_ms_p99"):
        assert set(r[key]) == SIZES
        assert all(v > 0 for v in r[key].values())
    for key in ("launch_cold_pool_ms", "launch_cold_pool_ms_p99",
                "checkout_us_p50", "checkout_us_p99", "checkin_us_p50",
                "checkin_us_p99", "checkin_held_us_p50", "checkin_held_us_p99",
                "legacy_checkout_us_p50", "legacy_checkout_us_p99",
                "legacy_checkin_us_p50", "legacy_checkin_us_p99", "build_mib_per_s",
                "sha256_records_mib_per_s", "pool10k_list_s", "pool10k_flush_s",
                "grpc_call_us_p50", "fd_round_trip_us_p50",
                "grpc_server_threads_us_p50", "grpc_server_aio_us_p50"):
        assert r[key] > 0, key
    assert r["checkout_us_p99"] >= r["checkout_us_p50"]
    assert r["launch_cold_dlopen_ms"] < r["launch_cold_pool_ms"]
    assert set(r["pairs_per_s"]) == {"1", "4", "16"}
    assert all(v["errors"] == 0 and v["pairs_per_s"] > 0
               for v in r["pairs_per_s"].values())
    assert r["pool10k_rss_kib_per_enclave"] >= 0
    # The Go client's figures: None unless `make go-client` built it.
    go_built = (REPO / "build" / "epm-go-client").exists()
    for key in ("legacy_go_checkout_us_p50", "legacy_go_checkout_us_p99",
                "legacy_go_checkin_us_p50", "legacy_go_checkin_us_p99",
                "go_grpc_call_us_p50"):
        assert key in r, key
        if go_built:
            assert r[key] > 0, key
        else:
            assert r[key] is None, key
    assert "| check-out, hand-off socket |" in table.read_text()
    go_row = "| check-out, published clients' path, Go client (gRPC) | "
    assert go_row + ("" if go_built else "not measured") in table.read_text()
