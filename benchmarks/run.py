"""make bench: measure epm's launch, hand-off and pool figures.

Writes benchmarks/results.json and prints a table. Each figure is the median
of several runs (p99 where it applies). Every daemon runs in a temporary
directory and is stopped by its pid.
"""

import argparse
import fcntl
import hashlib
import json
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import structlog  # noqa: E402

from conftest import Daemon  # noqa: E402
from epm_client import Client, Identity, LayoutEntry  # noqa: E402
from skeleton.backends import sim  # noqa: E402
from skeleton.enclave import Enclave  # noqa: E402
from skeleton.image import load_image  # noqa: E402
from skeleton.pal import Pal  # noqa: E402

SIZES = (8, 32, 64, 80)
SUBTYPE = "bench-1.0"
SMALL = 1 << 16  # enclave size of the synthetic enclaves in pool figures


def median(xs):
    return statistics.median(xs)


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def small_identity(tag=0):
    return Identity(mrenclave=tag.to_bytes(32, "little"), mrsigner=b"\x01" * 32,
                    attributes=0x4, xfrm=0x3, size=SMALL, backend="sim")


SMALL_LAYOUT = [LayoutEntry(0x200000000000, 4096),
                LayoutEntry(0x200000001000, SMALL - 4096, execute=True)]


def small_memfd():
    fd = os.memfd_create("epm-sim-enclave", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SMALL)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def launches(images, daemon, runs):
    """pal_init through pal_destroy, built (no-epm) and from the pool."""
    built, pooled = {}, {}
    args = f"sim epm-socket={daemon.grpc_socket}"
    for size in SIZES:
        image_dir = images / str(size)
        built[str(size)] = median([_launch(image_dir, "sim no-epm")[1]
                                   for _ in range(max(3, runs // 4))])
        _launch(image_dir, args)  # fills the pool
        samples = []
        for _ in range(runs):
            source, ms = _launch(image_dir, args)
            if source != "pool":
                raise RuntimeError(f"launch at {size} MiB was {source}")
            samples.append(ms)
        pooled[str(size)] = median(samples)
    return built, pooled


def _launch(image_dir, args):
    pal = Pal()
    started = time.perf_counter()
    pal.init(args, image_dir=image_dir)
    pal.destroy()
    return pal.source, (time.perf_counter() - started) * 1000


def checkout_checkin(images, daemon, runs):
    """A warm client: check-out with the fd mapped, and check-in."""
    image = load_image(images / "8")
    identity = image.identity("sim")
    enclave = sim.build(image)
    client = Client(daemon.grpc_socket)
    layout, fd = enclave.layout, enclave.fd
    enclave.unmap()
    out_us, in_us = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        pool_id = client.check_in(fd, SUBTYPE, layout, identity)
        client.save_final(pool_id)
        t1 = time.perf_counter()
        os.close(fd)
        got = client.check_out(SUBTYPE, identity)
        mapped = Enclave.adopt(got.fd, got.layout, got.identity)
        mapped.map()
        t2 = time.perf_counter()
        in_us.append((t1 - t0) * 1e6)
        out_us.append((t2 - t1) * 1e6)
        mapped.unmap()
        fd = mapped.fd
    os.close(fd)
    client.close()
    return out_us, in_us


def _pair_worker(socket_path, seconds, start, queue):
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    client = Client(socket_path)
    fd = small_memfd()
    pairs = errors = 0
    start.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pool_id = client.check_in(fd, SUBTYPE, SMALL_LAYOUT, small_identity())
            client.save_final(pool_id)
            got = client.check_out(SUBTYPE, small_identity())
            if got is None:
                errors += 1
                continue
            os.close(fd)
            fd = got.fd
            pairs += 1
        except Exception:
            errors += 1
            client.close()
            client = Client(socket_path)
    os.close(fd)
    queue.put((pairs, errors))


def pairs_per_second(daemon, processes, seconds):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    queue = ctx.Queue()
    workers = [ctx.Process(target=_pair_worker,
                           args=(str(daemon.grpc_socket), seconds, start, queue))
               for _ in range(processes)]
    for w in workers:
        w.start()
    time.sleep(0.2)
    start.set()
    results = [queue.get(timeout=seconds + 60) for _ in workers]
    for w in workers:
        w.join(30)
    pairs = sum(r[0] for r in results)
    return pairs / seconds, sum(r[1] for r in results)


def build_speed(images, runs):
    """Sim build of the 64 MiB image against raw SHA-256 of its records."""
    image = load_image(images / "64")
    mib = image.mmap_size / (1 << 20)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sim.build(image).close()
        times.append(time.perf_counter() - t)
    pages = image.mmap_size // 4096
    per_page = 64 + 16 * (64 + 256)
    stream = os.urandom(per_page) * 256  # 256 pages' worth of records
    hash_times = []
    for _ in range(runs):
        h = hashlib.sha256()
        t = time.perf_counter()
        for _ in range(pages // 256):
            h.update(stream)
        hash_times.append(time.perf_counter() - t)
    return mib / median(times), mib / median(hash_times)


def pool10k(tmp, count):
    (tmp / "pool10k").mkdir()
    daemon = Daemon(tmp / "pool10k", extra_config=(
        f"[pool]\nmax_total = {count}\nmax_per_identity = {count}\n")).start()
    try:
        client = Client(daemon.grpc_socket)
        client.health()
        rss0 = _rss_kib(daemon.proc.pid)
        for _ in range(count):
            fd = small_memfd()
            try:
                client.save_final(client.check_in(fd, SUBTYPE, SMALL_LAYOUT,
                                                  small_identity()))
            finally:
                os.close(fd)
        rss1 = _rss_kib(daemon.proc.pid)
        t = time.perf_counter()
        listed = len(client.list())
        list_s = time.perf_counter() - t
        t = time.perf_counter()
        flushed, _ = client.flush()
        flush_s = time.perf_counter() - t
        client.close()
        if listed != count or flushed != count:
            raise RuntimeError(f"listed {listed}, flushed {flushed} of {count}")
        return (rss1 - rss0) / count, list_s, flush_s
    finally:
        daemon.stop()


def _rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=pathlib.Path, default=REPO / "build/images")
    parser.add_argument("--out", type=pathlib.Path,
                        default=REPO / "benchmarks" / "results.json")
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    runs = 5 if args.quick else 20
    results = {}
    with tempfile.TemporaryDirectory(prefix="epm-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "main").mkdir()
        daemon = Daemon(tmp / "main").start()
        try:
            built, pooled = launches(args.images, daemon, runs)
            results["launch_build_ms"] = built
            results["launch_pool_ms"] = pooled
            out_us, in_us = checkout_checkin(args.images, daemon,
                                             200 if args.quick else 2000)
            results["checkout_us_p50"] = median(out_us)
            results["checkout_us_p99"] = p99(out_us)
            results["checkin_us_p50"] = median(in_us)
            results["checkin_us_p99"] = p99(in_us)
            results["pairs_per_s"] = {}
            for n in (1, 4, 16):
                rate, errors = pairs_per_second(daemon, n, 2 if args.quick else 5)
                results["pairs_per_s"][str(n)] = {"pairs_per_s": rate,
                                                  "errors": errors}
        finally:
            daemon.stop()
        results["build_mib_per_s"], results["sha256_records_mib_per_s"] = \
            build_speed(args.images, 3 if args.quick else 7)
        (results["pool10k_rss_kib_per_enclave"], results["pool10k_list_s"],
         results["pool10k_flush_s"]) = pool10k(tmp, 1000 if args.quick else 10000)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(r):
    print(f"{'figure':<34} {'value':>14}")
    for key, value in r.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, dict):
                    v = f"{v['pairs_per_s']:.0f} ({v['errors']} err)"
                    print(f"{key + '[' + sub + ']':<34} {v:>14}")
                else:
                    print(f"{key + '[' + sub + ']':<34} {v:>14.2f}")
        else:
            print(f"{key:<34} {value:>14.2f}")


if __name__ == "__main__":
    main()
