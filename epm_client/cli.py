"""epmctl: look at and empty the daemon's pools.

    epmctl list [--json] [--subtype S]
    epmctl flush [SUBTYPE]

Every failure is one line on stderr and a non-zero exit status.
"""

import argparse
import datetime
import json
import sys

from epm_client import errors
from epm_client.client import Client, default_socket
from epm_client.types import ENCLAVE_POOL

EXIT_ERROR = 1


def main(argv=None):
    args = _parser().parse_args(argv)
    client = Client(args.socket)
    try:
        return args.run(client, args)
    except errors.EpmError as e:
        print(f"epmctl: {e}", file=sys.stderr)
    finally:
        client.close()
    return EXIT_ERROR


def _parser():
    parser = argparse.ArgumentParser(
        prog="epmctl", description="Inspect and empty the epm enclave pools.")
    parser.add_argument("--socket", default=default_socket(),
                        help="the daemon's gRPC socket (default: $EPM_SOCKET "
                             "or %(default)s)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    list_ = commands.add_parser("list", help="show pooled enclaves")
    list_.add_argument("--json", action="store_true",
                       help="print a JSON array instead of a table")
    list_.add_argument("--subtype", default="", help="only this subtype")
    list_.add_argument("--type", default=ENCLAVE_POOL, help="the pool type")
    list_.set_defaults(run=_list)

    flush = commands.add_parser(
        "flush", help="close every available enclave (of one subtype)")
    flush.add_argument("subtype", nargs="?", default="",
                       help="only this subtype (default: every subtype)")
    flush.add_argument("--type", default=ENCLAVE_POOL, help="the pool type")
    flush.set_defaults(run=_flush)
    return parser


def _list(client, args):
    entries = client.list(args.subtype, args.type)
    if args.json:
        json.dump([_as_json(e) for e in entries], sys.stdout, indent=2)
        print()
        return 0
    rows = [("ID", "SUBTYPE", "STATE", "BACKEND", "SIZE", "MRENCLAVE", "CREATED")]
    for e in entries:
        ident = e.identity
        rows.append((
            e.id, e.subtype, e.state or "-",
            ident.backend if ident else "-",
            _size(ident.size) if ident else "-",
            ident.mrenclave.hex()[:16] if ident else "-",
            _time(e.created)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"{len(entries)} enclave{'s' if len(entries) != 1 else ''}")
    return 0


def _flush(client, args):
    deleted, kept = client.flush(args.subtype, args.type)
    where = f" of subtype {args.subtype}" if args.subtype else ""
    print(f"flushed {deleted} enclave{'s' if deleted != 1 else ''}{where}"
          + (f"; {kept} in use kept" if kept else ""))
    return 0


def _as_json(entry):
    ident = entry.identity
    return {
        "id": entry.id, "type": entry.type, "subtype": entry.subtype,
        "state": entry.state, "created": entry.created,
        "identity": None if ident is None else {
            "mrenclave": ident.mrenclave.hex(), "mrsigner": ident.mrsigner.hex(),
            "attributes": ident.attributes, "xfrm": ident.xfrm,
            "size": ident.size, "backend": ident.backend},
        "layout": [{"addr": hex(x.addr), "size": x.size, "read": x.read,
                    "write": x.write, "execute": x.execute, "share": x.share,
                    "private": x.private} for x in entry.layout],
    }


def _size(nbytes):
    return f"{nbytes / (1 << 20):g} MiB" if nbytes >= 1 << 20 else f"{nbytes} B"


def _time(unix_s):
    if not unix_s:
        return "-"
    return datetime.datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S")


if __name__ == "__main__":
    sys.exit(main())
