"""The main job: instant launch with the epm pool, against building.

Starts the epm daemon on a socket in a temporary directory, launches the
skeleton through the PAL life cycle several times at each image size, first
with the pool and then with ``no-epm``, shows ``epmctl list`` and stops the
daemon. Needs no root and no SGX: the skeleton runs on its sim backend.
"""

import argparse
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import structlog

from skeleton.pal import Pal

SIZES = (8, 32, 64, 80)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=pathlib.Path, default=pathlib.Path("build/images"),
                        help="directory with one signed image per size in MiB")
    parser.add_argument("--launches", type=int, default=5,
                        help="launches per size with the pool (default %(default)s)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    with tempfile.TemporaryDirectory(prefix="epm-demo-") as tmp:
        daemon, socket = start_daemon(pathlib.Path(tmp))
        try:
            results = run_launches(args.images, socket, args.launches)
            print()
            summarize(results)
            print("\n$ epmctl list")
            sys.stdout.flush()
            subprocess.run([sys.executable, "-m", "epm_client.cli", "--socket",
                            str(socket), "list"], check=False)
        finally:
            stop_daemon(daemon)


def start_daemon(tmp):
    socket = tmp / "run" / "epm.sock"
    config = tmp / "config.toml"
    config.write_text(f'root = "{tmp / "root"}"\n'
                      f'db_path = "{tmp / "root" / "epm.db"}"\n'
                      f'[grpc]\naddress = "{socket}"\n')
    log = open(tmp / "epm.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "epm_server.main",
                               "--config", str(config)],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    handoff = socket.parent / "epm-handoff.sock"
    while not (socket.exists() and handoff.exists()):
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            sys.exit(f"epm did not start:\n{(tmp / 'epm.log').read_text()}")
        time.sleep(0.05)
    print(f"epm started (pid {daemon.pid}) on {socket}\n")
    return daemon, socket


def stop_daemon(daemon):
    daemon.send_signal(signal.SIGTERM)
    try:
        code = daemon.wait(30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        code = daemon.wait()
    print(f"\nepm stopped (exit code {code})")


def launch(image_dir, args):
    """One PAL life cycle; returns (source, pal_init ms, greeting)."""
    pal = Pal()
    pal.init(args, image_dir=image_dir)
    read, write = os.pipe()
    quiet = os.open(os.devnull, os.O_WRONLY)
    try:
        pid = pal.create_process("/bin/skeleton", ["skeleton"],
                                 stdio=(0, write, quiet))
        os.close(write)
        write = None
        exit_value = pal.exec(pid)
        greeting = os.read(read, 256).decode().strip()
    finally:
        os.close(read)
        os.close(quiet)
        if write is not None:
            os.close(write)
        pal.destroy()
    if exit_value != 0:
        sys.exit(f"the workload exited with {exit_value}")
    return pal.source, pal.init_ms, greeting


def run_launches(images, socket, launches):
    results = {}
    print(f"{'size':>8}  {'mode':<7}  {'enclave':<10}  {'pal_init':>10}  workload")
    for mode, args, count in (("epm", f"sim epm-socket={socket}", launches),
                              ("no-epm", "sim no-epm", 2)):
        for size in SIZES:
            for _ in range(count):
                source, ms, greeting = launch(images / str(size), args)
                results.setdefault((size, mode, source), []).append(ms)
                print(f"{size:>4} MiB  {mode:<7}  {source:<10}  {ms:>7.2f} ms"
                      f"  {greeting}")
                sys.stdout.flush()
    return results


def summarize(results):
    print("median pal_init by size:")
    print(f"{'size':>8}  {'built':>10}  {'from pool':>10}  speed-up")
    for size in SIZES:
        built = results.get((size, "no-epm", "built"), []) \
            + results.get((size, "epm", "built"), [])
        pooled = results.get((size, "epm", "pool"), [])
        if not built or not pooled:
            print(f"{size:>4} MiB  (no {'pool hits' if built else 'builds'})")
            continue
        b, p = statistics.median(built), statistics.median(pooled)
        print(f"{size:>4} MiB  {b:>7.2f} ms  {p:>7.2f} ms  {b / p:>6.0f}x")


if __name__ == "__main__":
    main()
