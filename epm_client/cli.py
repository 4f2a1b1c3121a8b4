"""epmctl: look at, empty and tune the daemon's pools.

Every failure is one line on stderr and a non-zero exit status (see
``EXIT_CODES``); the commands and their options are in ``epmctl --help``.
"""

import datetime
import json
import sys

import click

from epm_client import errors
from epm_client.client import DEFAULT_SOCKET, Client
from epm_client.types import ENCLAVE_POOL

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# `epmctl health` only: the daemon answered but is not serving.
EXIT_NOT_SERVING = 2
STATES = ("pending", "held", "available", "leased")

EXIT_CODES = """\b
Exit status:
  0  success (health: the daemon is serving)
  1  the daemon is not reachable, refused the request, or a flush was
     not confirmed
  2  bad usage (health: the daemon answers but is not serving)"""


class _Abort(Exception):
    """A failure already worded for the user; ``code`` is the exit status."""

    def __init__(self, message, code=EXIT_ERROR):
        super().__init__(message)
        self.code = code


def main(argv=None):
    """Run epmctl; return its exit status."""
    try:
        cli.main(args=argv, prog_name="epmctl", standalone_mode=False)
    except errors.EpmError as e:
        click.echo(f"epmctl: {e}", err=True)
        return EXIT_ERROR
    except _Abort as e:
        if str(e):
            click.echo(f"epmctl: {e}", err=True)
        return e.code
    except click.exceptions.Abort:
        click.echo("epmctl: cancelled", err=True)
        return EXIT_ERROR
    except click.ClickException as e:
        e.show()
        return EXIT_USAGE
    except click.exceptions.Exit as e:
        return e.exit_code
    return EXIT_OK


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h",
                                                                        "--help"]})
@click.option("--socket", "socket_path", envvar="EPM_SOCKET",
              default=DEFAULT_SOCKET, show_default=True,
              help="The daemon's gRPC socket (or $EPM_SOCKET).")
@click.pass_context
def cli(ctx, socket_path):
    """Inspect, empty and tune the epm enclave pools."""
    ctx.obj = socket_path


@cli.command("list")
@click.option("--type", "pool_type", default=ENCLAVE_POOL, show_default=True,
              help="The pool type.")
@click.option("--subtype", default="", help="Only this subtype.")
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="Only enclaves in this state (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, not a table.")
@click.pass_obj
def list_(socket_path, pool_type, subtype, states, as_json):
    """Show pooled enclaves (or bundle caches)."""
    with Client(socket_path) as client:
        entries = client.list(subtype, pool_type)
    if states:
        entries = [e for e in entries if e.state in states]
    if as_json:
        click.echo(json.dumps([_as_json(e) for e in entries], indent=2))
        return
    rows = [("ID", "SUBTYPE", "STATE", "BACKEND", "SIZE", "MRENCLAVE", "CREATED")]
    for e in entries:
        ident = e.identity
        rows.append((
            e.id, e.subtype, e.state or "-",
            ident.backend if ident else "-",
            _size(ident.size) if ident else "-",
            ident.mrenclave.hex()[:16] if ident else "-",
            _time(e.created)))
    _table(rows)
    click.echo(_count(len(entries), "enclave"))


@cli.command()
@click.argument("subtype", default="")
@click.option("--type", "pool_type", default=ENCLAVE_POOL, show_default=True,
              help="The pool type.")
@click.option("--yes", "-y", is_flag=True,
              help="Empty every subtype without asking.")
@click.pass_obj
def flush(socket_path, subtype, pool_type, yes):
    """Close every available enclave (of SUBTYPE only, when given).

    Emptying every subtype asks first, unless --yes; a subtype's flush
    does not ask.
    """
    with Client(socket_path) as client:
        if not subtype and not yes:
            # Ask the daemon first: an unreachable daemon is told at once,
            # and the question says what would go.
            count = sum(1 for e in client.list("", pool_type)
                        if e.state in ("available", "", None))
            if not click.confirm(f"Close {_count(count, 'available enclave')} "
                                 "of every subtype?", err=True):
                raise _Abort("flush not confirmed; nothing closed")
        if pool_type == ENCLAVE_POOL:
            # One call for the whole pool, not a round trip per enclave.
            from epm_client.admin import AdminClient
            with AdminClient(socket_path) as admin:
                deleted, kept = admin.flush(subtype)
        else:
            deleted, kept = client.flush(subtype, pool_type)
    where = f" of subtype {subtype}" if subtype else ""
    click.echo(f"flushed {_count(deleted, 'enclave')}{where}"
               + (f"; {kept} in use kept" if kept else ""))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON, not a table.")
@click.pass_obj
def stats(socket_path, as_json):
    """Pool sizes by subtype and state, and check-outs since the daemon started."""
    from epm_client.admin import AdminClient
    with AdminClient(socket_path) as admin:
        reply = admin.stats()
    subtypes = [{"subtype": s.subtype, "states": dict(s.states), "hits": s.hits,
                 "misses": s.misses, "failed_handoffs": s.failed_handoffs}
                for s in reply.subtypes]
    if as_json:
        click.echo(json.dumps({"total": reply.total, "capacity": reply.capacity,
                               "subtypes": subtypes}, indent=2))
        return
    rows = [("SUBTYPE", *(s.upper() for s in STATES), "HITS", "MISSES",
             "FAILED")]
    for s in subtypes:
        rows.append((s["subtype"], *(str(s["states"].get(x, 0)) for x in STATES),
                     str(s["hits"]), str(s["misses"]),
                     str(s["failed_handoffs"])))
    _table(rows)
    click.echo(f"{_count(reply.total, 'enclave')} of {reply.capacity}")


@cli.command()
@click.option("--service", default="",
              help='The service to ask about (default "": the daemon).')
@click.pass_obj
def health(socket_path, service):
    """Ask the daemon's gRPC health service; print its status.

    Exit status 0 when serving, 1 when the daemon is not reachable, 2 when
    it answers but is not serving (shutting down).
    """
    from epm_client.admin import SERVING, AdminClient
    with AdminClient(socket_path) as admin:
        try:
            status = admin.health(service)
        except errors.NotFound:
            raise errors.NotFound(
                f"the daemon reports no health for service {service!r}") from None
    click.echo(status)
    if status != SERVING:
        raise _Abort("", EXIT_NOT_SERVING)


@cli.command()
@click.argument("subtype", required=False)
@click.argument("count", required=False, type=click.IntRange(0, 4096))
@click.option("--json", "as_json", is_flag=True, help="JSON, not a table.")
@click.pass_obj
def prewarm(socket_path, subtype, count, as_json):
    """Show the pre-warmed pools, or set SUBTYPE's target to COUNT.

    Targets set here last until the daemon restarts; the config's
    [[prewarm]] tables register the images.
    """
    from epm_client.admin import AdminClient
    if subtype is not None and count is None:
        raise click.UsageError("give both SUBTYPE and COUNT, or neither")
    with AdminClient(socket_path) as admin:
        pools = (admin.prewarm() if subtype is None
                 else admin.set_prewarm(subtype, count))
    found = [{"subtype": p.subtype, "target": p.target, "available": p.available,
              "building": p.building, "recycle": p.recycle,
              "backend": p.backend, "image": p.image, "failures": p.failures,
              "last_error": p.last_error or None,
              "last_error_time": p.last_error_time or None} for p in pools]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    rows = [("SUBTYPE", "TARGET", "AVAILABLE", "BUILDING", "STATE", "RECYCLE",
             "BACKEND", "IMAGE")]
    for p in found:
        rows.append((p["subtype"], str(p["target"]), str(p["available"]),
                     str(p["building"]), "failing" if p["failures"] else "ok",
                     "yes" if p["recycle"] else "no", p["backend"], p["image"]))
    _table(rows)
    # A failing pool says why under the table: its builds are retried every
    # few seconds, and the reason is otherwise only in the daemon's log.
    for p in found:
        if p["failures"]:
            click.echo(f"{p['subtype']}: {_count(p['failures'], 'build')} failed, "
                       f"the last at {_time(p['last_error_time'])}: "
                       f"{p['last_error']}")


def _table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _count(n, noun):
    return f"{n} {noun}{'s' if n != 1 else ''}"


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
