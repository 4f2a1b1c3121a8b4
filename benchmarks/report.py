"""The results table: each figure beside its target and the published figure.

Targets and reference figures are those of issue 7: the published pool on
real SGX hardware, and the published Go daemon measured on this kind of
machine (2 cores). A target is None where the issue sets none.
"""

SIZES = ("8", "32", "64", "80")
PUBLISHED_BUILD_MS = {"8": 55, "32": 206, "64": 410, "80": 507}
# The Go client's figures (benchmarks/go_client) when it was not built.
NOT_MEASURED = "not measured (make go-client)"


def rows(r):
    """``(figure, ours, target, met, reference)`` strings for each figure."""
    out = []
    pool = r["launch_pool_ms"]
    flat = max(pool.values()) <= min(pool.values()) * 1.10 or \
        abs(pool["80"] - pool["8"]) <= 0.1 * pool["8"]
    for size in SIZES:
        if size in r["launch_build_ms"]:
            out.append((f"launch built, {size} MiB", _ms(r["launch_build_ms"][size]),
                        "", None, f"{PUBLISHED_BUILD_MS[size]} ms (SGX hardware)"))
    for size in SIZES:
        if size in pool:
            ms = pool[size]
            out.append((f"launch from pool, {size} MiB",
                         f"{_ms(ms)} (p99 {_ms(r['launch_pool_ms_p99'][size])})",
                         "<= 2 ms, flat", ms <= 2.0 and flat,
                         "22 ms flat (SGX hardware)"))
    out.append(("cold launch from pool (dlopen + pal_init)",
                f"{_ms(r['launch_cold_pool_ms'])} (p99 "
                f"{_ms(r['launch_cold_pool_ms_p99'])}; dlopen "
                f"{_ms(r['launch_cold_dlopen_ms'])})",
                "<= 40 ms", r["launch_cold_pool_ms"] <= 40, ""))
    out.append(("check-out, hand-off socket", _us(r, "checkout"),
                "p50 <= 150 us, p99 <= 1 ms",
                r["checkout_us_p50"] <= 150 and r["checkout_us_p99"] <= 1000,
                "710-855 us, p99 1.6-3.7 ms (Go daemon)"))
    out.append(("check-in, hand-off socket (one request: CheckIn.available)",
                _us(r, "checkin"),
                "p50 <= 300 us", r["checkin_us_p50"] <= 300,
                "1.17-1.49 ms (Go daemon)"))
    out.append(("check-in held, then save-final (two requests, as the PAL after "
                "a build)", _us(r, "checkin_held"), "", None, ""))
    out.append(("check-out, published clients' path (gRPC)",
                _us(r, "legacy_checkout"), "", None,
                "710-855 us, p99 1.6-3.7 ms (Go daemon)"))
    out.append(("check-in, published clients' path (gRPC)",
                _us(r, "legacy_checkin"), "", None, "1.17-1.49 ms (Go daemon)"))
    out.append(("check-out, published clients' path, Go client (gRPC)",
                _us_or_unmeasured(r, "legacy_go_checkout"), "", None,
                "710-855 us, p99 1.6-3.7 ms (Go daemon)"))
    out.append(("check-in, published clients' path, Go client (gRPC)",
                _us_or_unmeasured(r, "legacy_go_checkin"), "", None,
                "1.17-1.49 ms (Go daemon)"))
    out.append(("one gRPC call (Healthz, warm channel)",
                f"{r['grpc_call_us_p50']:.0f} us", "", None,
                "about 470 us (the issue's floor)"))
    go_call = r.get("go_grpc_call_us_p50")
    out.append(("one gRPC call, Go client (Healthz, warm channel)",
                NOT_MEASURED if go_call is None else f"{go_call:.0f} us", "", None,
                ""))
    out.append(("one gRPC call, thread-pool server / grpc.aio server (bare)",
                f"{r['grpc_server_threads_us_p50']:.0f} us / "
                f"{r['grpc_server_aio_us_p50']:.0f} us", "", None, ""))
    out.append(("one fd round trip (socket pair, blocking, no daemon)",
                f"{r['fd_round_trip_us_p50']:.0f} us", "", None,
                "about 40 us (the issue's floor)"))
    reference = {"1": "360-455 (Go daemon)", "4": "600-700 (Go daemon)", "16": ""}
    for procs, got in r["pairs_per_s"].items():
        met = None
        if procs == "4":
            met = got["pairs_per_s"] >= 3000 and got["errors"] == 0
        out.append((f"pairs/s, {procs} client processes",
                    f"{got['pairs_per_s']:,.0f} ({got['errors']} errors)",
                    ">= 3,000, no errors" if procs == "4" else "", met,
                    reference[procs]))
    ceiling = r["sha256_records_mib_per_s"]
    out.append(("sim build speed", f"{r['build_mib_per_s']:.0f} MiB/s",
                f">= 70% of SHA-256 ({0.7 * ceiling:.0f} MiB/s)",
                r["build_mib_per_s"] >= 0.7 * ceiling, ""))
    out.append(("SHA-256 over the record stream", f"{ceiling:.0f} MiB/s", "", None,
                ""))
    count = r.get("pool10k_count", 10000)
    out.append((f"pooled enclaves ({count:,}): daemon memory each",
                f"{r['pool10k_rss_kib_per_enclave']:.2f} KiB", "<= 10 KiB",
                r["pool10k_rss_kib_per_enclave"] <= 10, ""))
    out.append((f"pooled enclaves ({count:,}): list", f"{r['pool10k_list_s']:.2f} s",
                "<= 1 s", r["pool10k_list_s"] <= 1, ""))
    out.append((f"pooled enclaves ({count:,}): flush",
                f"{r['pool10k_flush_s']:.2f} s", "<= 1 s",
                r["pool10k_flush_s"] <= 1, ""))
    return out


def print_table(r):
    """The table on stdout, one figure a line."""
    table = [("figure", "ours", "target", "met", "reference")]
    table += [(figure, ours, target, _met(met), reference)
              for figure, ours, target, met, reference in rows(r)]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)),
              row[4])


def write_markdown(r, path):
    """The same table in Markdown, for the README."""
    lines = [f"Scale: {r['scale']}.", "",
             "| figure | ours | target | met | reference |",
             "|---|---|---|---|---|"]
    for figure, ours, target, met, reference in rows(r):
        lines.append(f"| {figure} | {ours} | {target} | {_met(met)} | {reference} |")
    path.write_text("\n".join(lines) + "\n")


def _met(met):
    return "" if met is None else "yes" if met else "no"


def _ms(ms):
    return f"{ms:.2f} ms"


def _us_or_unmeasured(r, key):
    # Results written before the Go client existed have no such keys.
    if r.get(key + "_us_p50") is None:
        return NOT_MEASURED
    return _us(r, key)


def _us(r, key):
    return f"{r[key + '_us_p50']:.0f} us (p99 {r[key + '_us_p99']:.0f} us)"
