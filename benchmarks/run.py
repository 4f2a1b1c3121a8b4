"""make bench: measure epm's launch, hand-off and pool figures (issue 7).

Writes benchmarks/results.json and benchmarks/results.md (the table printed
at the end: each figure beside its target and the published reference).
Each figure is the median of several runs, with p99 where it applies. Every
daemon runs in a temporary directory, logs at its default level (info) and
is stopped by its pid.
"""

import argparse
import array
import fcntl
import hashlib
import json
import multiprocessing
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

# The suite forks (pair clients, the fd round trip) after using gRPC: its fork
# handlers can deadlock a fork (grpc/grpc#22624), as in the tests.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import structlog  # noqa: E402

import grpc_servers  # noqa: E402
from live_daemon import Daemon  # noqa: E402
from epm_client import Client, Identity, LayoutEntry  # noqa: E402
from epm_client.admin import AdminClient  # noqa: E402
from report import print_table, write_markdown  # noqa: E402
from skeleton.backends import sim  # noqa: E402
from skeleton.enclave import Enclave  # noqa: E402
from skeleton.image import load_image  # noqa: E402
from skeleton.pal import Pal  # noqa: E402

SIZES = (8, 32, 64, 80)
SUBTYPE = "bench-1.0"
LEGACY_SUBTYPE = "bench-legacy-1.0"
LIBRARY = REPO / "build" / "liberpal-skeleton-v3.so"
COLD_SOURCE = REPO / "benchmarks" / "cold_launch.c"
SMALL = 1 << 16  # enclave size of the synthetic enclaves in pool figures
GO_CLIENT = REPO / "build" / "epm-go-client"  # `make go-client`
GO_LEGACY_SUBTYPE = "bench-legacy-go-1.0"
GO_KEYS = {"checkout_us_p50": "legacy_go_checkout_us_p50",
           "checkout_us_p99": "legacy_go_checkout_us_p99",
           "checkin_us_p50": "legacy_go_checkin_us_p50",
           "checkin_us_p99": "legacy_go_checkin_us_p99",
           "grpc_call_us_p50": "go_grpc_call_us_p50"}


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


def launches(images, daemon, runs, built_runs, sizes=SIZES):
    """pal_init through pal_destroy, built (no-epm) and from the pool.

    The sizes take turns, round by round, in an order that reverses every
    round: the machine drifts over a run of this length (other processes,
    frequency, the daemon's heap), and measured one size after another that
    drift would show as a difference between sizes. Returns ``(built,
    pooled, pooled_p99)``, each keyed by size in MiB.
    """
    args = f"sim epm-socket={daemon.grpc_socket}"
    built = _rounds(sizes, built_runs, lambda size: _launch(
        images / str(size), "sim no-epm", "built"))
    for size in sizes:
        _launch(images / str(size), args, "built")  # fills the pool
    pooled = _rounds(sizes, runs, lambda size: _launch(
        images / str(size), args, "pool"))
    return ({str(s): median(built[s]) for s in sizes},
            {str(s): median(pooled[s]) for s in sizes},
            {str(s): p99(pooled[s]) for s in sizes})


def _rounds(sizes, runs, measure):
    """``runs`` samples of ``measure(size)`` per size, sizes taking turns."""
    samples = {size: [] for size in sizes}
    for i in range(runs):
        for size in (sizes if i % 2 == 0 else sizes[::-1]):
            samples[size].append(measure(size))
    return samples


def _launch(image_dir, args, source):
    """One launch in milliseconds; raises if the enclave came from elsewhere."""
    pal = Pal()
    started = time.perf_counter()
    pal.init(args, image_dir=image_dir)
    pal.destroy()
    took = (time.perf_counter() - started) * 1000
    if pal.source != source:
        raise RuntimeError(f"a launch from {image_dir} was {pal.source}, "
                           f"expected {source}")
    return took


def cold_launches(images, daemon, tmp, runs, size=8):
    """Fresh processes that dlopen the v3 library and launch from the pool.

    Returns ``(total_ms, dlopen_ms)`` samples: dlopen plus pal_init, and
    dlopen alone (Python's start and the launch path's imports).
    """
    host = tmp / "cold_launch"
    subprocess.run(["gcc", "-O1", "-o", str(host), str(COLD_SOURCE), "-ldl"],
                   check=True, capture_output=True)
    args = f"sim epm-socket={daemon.grpc_socket} subtype=bench-cold"
    client = Client(daemon.grpc_socket)
    total, dlopen = [], []
    try:
        for i in range(runs + 1):
            got = _cold_launch(host, images / str(size), args)
            available = [e for e in client.list("bench-cold")
                         if e.state == "available"]
            if len(available) != 1:
                raise RuntimeError(f"a cold launch left {len(available)} enclaves")
            if i == 0:
                continue  # the first launch builds and fills the pool
            total.append(got["dlopen_ms"] + got["init_ms"])
            dlopen.append(got["dlopen_ms"])
    finally:
        client.close()
    return total, dlopen


def _cold_launch(host, image_dir, args):
    env = {k: v for k, v in os.environ.items()
           if k not in ("SGX_MODE", "ENCLAVE_RUNTIME_ARGS")}
    proc = subprocess.run([str(host), str(LIBRARY), args], cwd=image_dir,
                          capture_output=True, text=True, timeout=60, env=env)
    got = dict(line.partition("=")[::2] for line in proc.stdout.splitlines())
    if proc.returncode != 0 or got.get("init") != "0":
        raise RuntimeError(f"cold launch failed: {proc.stdout}{proc.stderr}")
    return {k: float(v) for k, v in got.items() if k.endswith("_ms")}


def checkout_checkin(images, daemon, runs, held=False):
    """A warm client: check-out with the fd mapped, and check-in.

    The check-in makes the enclave available in the same round trip
    (``available``): what SaveCache, the fd hand-off and SaveFinalCache do
    for a published client. With ``held`` it is two requests, a check-in
    held by the client and its save-final, as the PAL does after a build.
    """
    image = load_image(images / "8")
    identity = image.identity("sim")
    enclave = sim.build(image)
    client = Client(daemon.grpc_socket)
    layout, fd = enclave.layout, enclave.fd
    enclave.unmap()
    out_us, in_us = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        if held:
            client.save_final(client.check_in(fd, SUBTYPE, layout, identity))
        else:
            client.check_in(fd, SUBTYPE, layout, identity, available=True)
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


def legacy_checkout_checkin(images, daemon, runs):
    """The published clients' path: gRPC plus a socket per request.

    Check-in is SaveCache, connect to ``<dir>/<ID>`` and send the fd, then
    SaveFinalCache; check-out listens on ``<dir>/<ID>``, calls GetCache and
    maps the fd it accepts. One warm gRPC channel, unlike the published
    client (which opens one per call, after a Healthz): this is the floor of
    that path, not its worst case.
    """
    import grpc
    from epm_api import v1alpha1_pb2 as pb
    from epm_api import v1alpha1_pb2_grpc as pb_grpc

    image = load_image(images / "8")
    identity = image.identity("sim")
    enclave = sim.build(image)
    layout, fd = enclave.layout, enclave.fd
    enclave.unmap()
    options = pb.Enclave(nr=len(layout), layout=[e.to_proto() for e in layout])
    run_dir = os.path.dirname(daemon.grpc_socket)
    channel = grpc.insecure_channel(f"unix:{daemon.grpc_socket}")
    stub = pb_grpc.EnclavePoolManagerStub(channel)
    out_us, in_us = [], []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            _legacy_check_in(stub, pb, run_dir, options, fd)
            t1 = time.perf_counter()
            os.close(fd)
            fd, got_layout = _legacy_check_out(stub, pb, run_dir)
            mapped = Enclave.adopt(fd, got_layout, identity)
            mapped.map()
            t2 = time.perf_counter()
            in_us.append((t1 - t0) * 1e6)
            out_us.append((t2 - t1) * 1e6)
            mapped.unmap()
    finally:
        os.close(fd)
        channel.close()
    return out_us, in_us


def _legacy_check_in(stub, pb, run_dir, options, fd):
    import grpc

    cache_id = uuid.uuid4().hex
    cache = pb.Cache(type="enclave-cache-pool", subType=LEGACY_SUBTYPE, ID=cache_id)
    cache.options.Pack(options)
    stub.SaveCache(pb.SaveCacheRequest(cache=cache), timeout=5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(os.path.join(run_dir, cache_id))
        conn.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [fd]).tobytes())])
    # The daemon takes the fd on its own thread: until it has, the entry is
    # pending and SaveFinalCache is refused. The published client calls it
    # much later (at pal_destroy); here the wait is part of the figure.
    final = pb.SaveCacheRequest(cache=pb.Cache(
        type="enclave-cache-pool", subType=LEGACY_SUBTYPE, ID=cache_id))
    deadline = time.monotonic() + 5
    while True:
        try:
            stub.SaveFinalCache(final, timeout=5)
            return
        except grpc.RpcError as e:
            if (e.code() != grpc.StatusCode.FAILED_PRECONDITION
                    or time.monotonic() > deadline):
                raise
            time.sleep(0.0001)


def _legacy_check_out(stub, pb, run_dir):
    """Listen on <dir>/<ID>, GetCache, accept the daemon's fd: (fd, layout)."""
    cache_id = uuid.uuid4().hex
    path = os.path.join(run_dir, cache_id)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(5)
        # The daemon may wait for the fd to be read before it answers.
        future = stub.GetCache.future(pb.GetCacheRequest(
            type="enclave-cache-pool", subType=LEGACY_SUBTYPE, ID=cache_id),
            timeout=5)
        conn, _ = listener.accept()
        with conn:
            _, ancdata, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
        reply = future.result()
    finally:
        os.unlink(path)
        listener.close()
    fd = array.array("i", ancdata[0][2])[0]
    enclave = pb.Enclave()
    reply.cache.options.Unpack(enclave)
    return fd, [LayoutEntry.from_proto(e) for e in enclave.layout]


def legacy_go_client(daemon, runs, binary=GO_CLIENT):
    """The published clients' path again, from Go: ``build/epm-go-client``.

    The published clients are Go, and the reference figures were taken Go
    to Go; this tells how much of the gap to them is the Python client's.
    The client does what legacy_checkout_checkin does, on a sealed memfd of
    SMALL bytes with SMALL_LAYOUT, plus Healthz calls on the same channel.
    Returns the GO_KEYS figures, all None when the client is not built.
    """
    if not binary.exists():
        return dict.fromkeys(GO_KEYS.values())
    # Each round is three calls and two socket hand-offs, each bounded by the
    # client at 5 s; a healthy round takes a few milliseconds.
    proc = subprocess.run(
        [str(binary), "-socket", str(daemon.grpc_socket), "-rounds", str(runs),
         "-subtype", GO_LEGACY_SUBTYPE],
        capture_output=True, text=True, timeout=60 + runs * 0.1)
    if proc.returncode != 0:
        raise RuntimeError(f"{binary.name} exited with {proc.returncode}: "
                           f"{proc.stderr.strip()}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return {ours: float(figures[theirs]) for theirs, ours in GO_KEYS.items()}


def primitives(daemon, runs):
    """What each path is built on: one gRPC call, and one fd round trip.

    A Healthz call on a warm channel to the daemon; and a one-byte request
    answered with an fd in SCM_RIGHTS by a forked process over a connected
    Unix socket pair, both sides blocking in recv, with no pool or protocol
    behind it. (Our hand-off polls before it blocks, on both sides, which
    saves the two wake-ups this one pays.) Returns ``(grpc_us, fd_us)``
    samples.
    """
    import grpc
    from epm_api import v1alpha1_pb2 as pb
    from epm_api import v1alpha1_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"unix:{daemon.grpc_socket}")
    stub = pb_grpc.EnclavePoolManagerStub(channel)
    grpc_us = []
    try:
        for _ in range(runs):
            t = time.perf_counter()
            stub.Healthz(pb.HealthzRequest(), timeout=5)
            grpc_us.append((time.perf_counter() - t) * 1e6)
    finally:
        channel.close()
    return grpc_us, _fd_round_trips(runs)


def _fd_round_trips(runs):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = small_memfd()
    pid = os.fork()
    if pid == 0:
        # The child never returns into the suite, whatever happens here.
        try:
            ours.close()
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                       array.array("i", [fd]).tobytes())]
            for _ in range(runs):
                theirs.recv(1)
                theirs.sendmsg([b"\0"], rights)
        finally:
            os._exit(0)
    theirs.close()
    os.close(fd)
    took = []
    try:
        ours.settimeout(5)
        for _ in range(runs):
            t = time.perf_counter()
            ours.send(b"\0")
            _, ancdata, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
            took.append((time.perf_counter() - t) * 1e6)
            os.close(array.array("i", ancdata[0][2])[0])
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return took


def _pair_worker(socket_path, seconds, start, queue):
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    client = Client(socket_path)
    fd = small_memfd()
    pairs = errors = 0
    start.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.check_in(fd, SUBTYPE, SMALL_LAYOUT, small_identity(),
                            available=True)
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
    """Sim build of the 64 MiB image against raw SHA-256 of its records.

    The two alternate run by run, so that drift lands on both alike. The
    record stream is hashed in 256-page updates, as fast as hashlib goes.
    """
    image = load_image(images / "64")
    mib = image.mmap_size / (1 << 20)
    pages = image.mmap_size // 4096
    per_page = 64 + 16 * (64 + 256)
    stream = os.urandom(per_page) * 256  # 256 pages' worth of records
    times, hash_times = [], []
    for _ in range(runs):
        t = time.perf_counter()
        sim.build(image).close()
        times.append(time.perf_counter() - t)
        h = hashlib.sha256()
        t = time.perf_counter()
        for _ in range(pages // 256):
            h.update(stream)
        hash_times.append(time.perf_counter() - t)
    return mib / median(times), mib / median(hash_times)


def pool10k(tmp, count):
    (tmp / "pool10k").mkdir()
    daemon = Daemon(tmp / "pool10k", log_level="info", extra_config=(
        f"[pool]\nmax_total = {count}\nmax_per_identity = {count}\n")).start()
    try:
        client = Client(daemon.grpc_socket)
        client.health()
        rss0 = _rss_kib(daemon.proc.pid)
        for _ in range(count):
            fd = small_memfd()
            try:
                client.check_in(fd, SUBTYPE, SMALL_LAYOUT, small_identity(),
                                available=True)
            finally:
                os.close(fd)
        rss1 = _rss_kib(daemon.proc.pid)
        t = time.perf_counter()
        listed = len(client.list())
        list_s = time.perf_counter() - t
        # As `epmctl flush` does it: one Admin.Flush call for the pool.
        with AdminClient(daemon.grpc_socket) as admin:
            t = time.perf_counter()
            flushed, _ = admin.flush()
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


# Runs of each figure by scale; "tiny" only checks that the suite works.
SCALES = {
    "full": dict(launch=400, build_launch=7, cold=10, handoff=2000, legacy=500,
                 pair_s=5, build=15, pool=10000),
    "quick": dict(launch=100, build_launch=3, cold=5, handoff=300, legacy=100,
                  pair_s=2, build=5, pool=1000),
    "tiny": dict(launch=2, build_launch=1, cold=1, handoff=5, legacy=3,
                 pair_s=0.3, build=1, pool=20),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=pathlib.Path, default=REPO / "build/images")
    parser.add_argument("--out", type=pathlib.Path,
                        default=REPO / "benchmarks" / "results.json")
    parser.add_argument("--table", type=pathlib.Path,
                        default=REPO / "benchmarks" / "results.md")
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument("--tiny", action="store_true",
                        help="a few runs of everything, to check the suite")
    parser.add_argument("--cold-only", type=int, metavar="RUNS",
                        help="only the cold launch, RUNS times; print, write nothing")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    # The sim backend's report secret (created when a PAL library loads)
    # goes to a directory of this run's, not to /var/lib/epm.
    secret_dir = tempfile.TemporaryDirectory(prefix="epm-bench-secret-")
    os.environ.setdefault("EPM_SIM_SECRET_DIR", secret_dir.name)
    if args.cold_only:
        print(json.dumps(cold_only(args.images, args.cold_only), indent=2))
        return
    scale = "tiny" if args.tiny else "quick" if args.quick else "full"
    results = run(args.images, scale)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.table)
    print_table(results)


def cold_only(images, runs):
    """The cold-launch figures alone, for measuring a change to the PAL."""
    with tempfile.TemporaryDirectory(prefix="epm-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "main").mkdir()
        daemon = Daemon(tmp / "main", log_level="info").start()
        try:
            total, dlopen = cold_launches(images, daemon, tmp, runs)
        finally:
            daemon.stop()
    return {"launch_cold_pool_ms": median(total),
            "launch_cold_pool_ms_p99": p99(total),
            "launch_cold_dlopen_ms": median(dlopen), "runs": runs}


def run(images, scale):
    """Every figure at ``scale`` (a key of SCALES); returns the results dict."""
    n = SCALES[scale]
    results = {"scale": scale}
    with tempfile.TemporaryDirectory(prefix="epm-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "main").mkdir()
        daemon = Daemon(tmp / "main", log_level="info").start()
        try:
            built, pooled, pooled_p99 = launches(images, daemon, n["launch"],
                                                 n["build_launch"])
            results["launch_build_ms"] = built
            results["launch_pool_ms"] = pooled
            results["launch_pool_ms_p99"] = pooled_p99
            total, dlopen = cold_launches(images, daemon, tmp, n["cold"])
            results["launch_cold_pool_ms"] = median(total)
            results["launch_cold_pool_ms_p99"] = p99(total)
            results["launch_cold_dlopen_ms"] = median(dlopen)
            out_us, in_us = checkout_checkin(images, daemon, n["handoff"])
            results["checkout_us_p50"] = median(out_us)
            results["checkout_us_p99"] = p99(out_us)
            results["checkin_us_p50"] = median(in_us)
            results["checkin_us_p99"] = p99(in_us)
            _, in_us = checkout_checkin(images, daemon, n["handoff"], held=True)
            results["checkin_held_us_p50"] = median(in_us)
            results["checkin_held_us_p99"] = p99(in_us)
            out_us, in_us = legacy_checkout_checkin(images, daemon, n["legacy"])
            results["legacy_checkout_us_p50"] = median(out_us)
            results["legacy_checkout_us_p99"] = p99(out_us)
            results["legacy_checkin_us_p50"] = median(in_us)
            results["legacy_checkin_us_p99"] = p99(in_us)
            results.update(legacy_go_client(daemon, n["legacy"]))
            grpc_us, fd_us = primitives(daemon, n["handoff"])
            results["grpc_call_us_p50"] = median(grpc_us)
            results["fd_round_trip_us_p50"] = median(fd_us)
            results["pairs_per_s"] = {}
            for procs in (1, 4, 16):
                rate, errors = pairs_per_second(daemon, procs, n["pair_s"])
                results["pairs_per_s"][str(procs)] = {"pairs_per_s": rate,
                                                      "errors": errors}
        finally:
            daemon.stop()
        servers = grpc_servers.compare(n["handoff"])
        results["grpc_server_threads_us_p50"] = servers["threads"]
        results["grpc_server_aio_us_p50"] = servers["aio"]
        results["build_mib_per_s"], results["sha256_records_mib_per_s"] = \
            build_speed(images, n["build"])
        (results["pool10k_rss_kib_per_enclave"], results["pool10k_list_s"],
         results["pool10k_flush_s"]) = pool10k(tmp, n["pool"])
        results["pool10k_count"] = n["pool"]
    return results


if __name__ == "__main__":
    main()
