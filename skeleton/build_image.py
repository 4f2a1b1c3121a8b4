"""Build the skeleton enclave image ``encl.bin`` from ``skeleton/enclave``.

Usage: ``python -m skeleton.build_image --out build/encl.bin``. The result is a
flat image: the TCS page, the entry record, code and data, padding to whole
pages, then a zeroed 17-byte metadata record that ``sgxsign`` fills in (DESIGN §5).
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

from skeleton.errors import ImageError
from skeleton.structs import (ENTRY_RECORD, ENTRY_RECORD_MAGIC, ENTRY_RECORD_OFFSET,
                              METADATA, PAGE_SIZE, TCS)

SOURCE_DIR = pathlib.Path(__file__).resolve().parent / "enclave"
ENTRY = "encl_entry"  # the stub EENTER runs (entry.S)
BODY = "encl_body"    # the C body, which sim calls (encl.c)
# Position independent, freestanding and statically linked at address 0: the
# image runs wherever the enclave is mapped and nothing patches it at load time.
# General registers only: the entry stub scrubs those before EEXIT, and no
# vector register is left holding what the enclave copied.
CFLAGS = ["-O2", "-fPIE", "-mgeneral-regs-only", "-fvisibility=hidden",
          "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-stack-protector",
          "-fno-tree-loop-distribute-patterns", "-fno-asynchronous-unwind-tables",
          "-static", "-no-pie", "-Wall", "-Werror", "-Wl,--build-id=none"]


def _run(*cmd):
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageError(f"{cmd[0]} not found: the image needs gcc and binutils")
    if done.returncode:
        raise ImageError(f"{cmd[0]} failed: {done.stderr.strip()}")
    return done.stdout


def _symbol(elf, name):
    for line in _run("nm", elf).splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == name:
            return int(fields[0], 16)
    raise ImageError(f"{elf}: no symbol {name}")


def build(out, source_dir=SOURCE_DIR):
    """Compile, link and flatten the enclave into ``out``; returns its size.

    Raises ImageError when a tool fails or the result is not a valid image.
    """
    source_dir = pathlib.Path(source_dir)
    sources = sorted(str(p) for pattern in ("*.c", "*.S")
                     for p in source_dir.glob(pattern))
    cc = os.environ.get("CC", "gcc")
    with tempfile.TemporaryDirectory() as tmp:
        elf = os.path.join(tmp, "encl.elf")
        flat = os.path.join(tmp, "encl.flat")
        _run(cc, *CFLAGS, "-Wl,-T," + str(source_dir / "encl.lds"), "-o", elf,
             *sources)
        if "There are no relocations" not in _run("readelf", "-r", elf):
            raise ImageError(f"{elf}: the enclave must need no relocations")
        entry = _symbol(elf, ENTRY)
        body = _symbol(elf, BODY)
        _run("objcopy", "-O", "binary", elf, flat)
        code = pathlib.Path(flat).read_bytes()

    # Check what the loaders rely on: a TCS whose entry is the entry stub,
    # inside the image and outside the TCS page itself, and an entry record
    # naming the C body for sim.
    oentry = TCS.get(code, "oentry")
    if oentry != entry or not PAGE_SIZE <= entry < len(code):
        raise ImageError(f"bad OENTRY {oentry:#x}: {ENTRY} is at {entry:#x} in an "
                         f"image of {len(code)} bytes")
    if TCS.get(code, "nssa") != 1:
        raise ImageError("the TCS must have exactly one SSA frame")
    record = ENTRY_RECORD.unpack(
        code[ENTRY_RECORD_OFFSET:ENTRY_RECORD_OFFSET + ENTRY_RECORD.size])
    if record.magic != ENTRY_RECORD_MAGIC or record.body != body:
        raise ImageError(f"bad entry record {record}: {BODY} is at {body:#x}")

    padded = code + bytes(-len(code) % PAGE_SIZE)
    image = padded + bytes(METADATA.size)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(image)
    return len(image)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the encl.bin to write")
    args = parser.parse_args(argv)
    try:
        build(args.out)
    except ImageError as e:
        print(f"build_image: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
