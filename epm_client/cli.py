"""epmctl: look at, empty and tune the daemon's pools.

Every failure is one line on stderr and a non-zero exit status (see
``EXIT_CODES``); the commands and their options are in ``epmctl --help``.
"""

import datetime
import functools
import json
import os
import socket
import stat
import sys

import click

from epm_client import errors
from epm_client.client import DEFAULT_SOCKET, HANDOFF_SOCKET_NAME, Client
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


def _reaching(command):
    """Word a DaemonUnavailable of ``command`` for what ``--socket`` names."""

    @functools.wraps(command)
    def run(socket_path, *args, **kwargs):
        try:
            return command(socket_path, *args, **kwargs)
        except errors.DaemonUnavailable as e:
            raise errors.DaemonUnavailable(_unreachable(socket_path, e)) from None

    return run


def _unreachable(path, error):
    """Why ``path`` did not answer as epm's gRPC socket, or ``error``'s words.

    A connect to a file or a directory is refused like a connect to a
    socket that nobody listens on; and gRPC reports a socket that accepts
    but does not speak HTTP/2 (epm's own hand-off socket) in its own terms.
    """
    hint = ("--socket (or $EPM_SOCKET) names the daemon's gRPC socket, "
            f"{DEFAULT_SOCKET} by default")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return str(error)
    if stat.S_ISDIR(mode):
        return f"{path} is a directory, not a socket: {hint}"
    if not stat.S_ISSOCK(mode):
        return f"{path} is not a socket: {hint}"
    if os.path.basename(path) == HANDOFF_SOCKET_NAME:
        beside = os.path.join(os.path.dirname(path), "epm.sock")
        return (f"{path} is epm's hand-off socket, not its gRPC socket; the "
                f"gRPC socket is {beside} unless the config moved it")
    if "HTTP/2" in str(error) and _accepts(path):
        return (f"{path} accepts connections but does not speak gRPC: it is not "
                f"epm's gRPC socket (the hand-off socket is not); {hint}")
    return str(error)


def _accepts(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


@cli.command("list")
@click.option("--type", "pool_type", default=ENCLAVE_POOL, show_default=True,
              help="The pool type.")
@click.option("--subtype", default="", help="Only this subtype.")
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="Only enclaves in this state (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, not a table.")
@click.pass_obj
@_reaching
def list_(socket_path, pool_type, subtype, states, as_json):
    """Show pooled enclaves (or bundle caches)."""
    if pool_type != ENCLAVE_POOL:
        if states:
            raise click.UsageError("--state: bundle caches have no state")
        _list_caches(socket_path, pool_type, subtype, as_json)
        return
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


def _list_caches(socket_path, pool_type, subtype, as_json):
    from epm_client.admin import AdminClient
    with AdminClient(socket_path) as admin:
        caches = admin.caches(pool_type, subtype)
    found = [{"id": c.ID, "type": c.type, "subtype": c.subType, "size": c.size,
              "parent": ({"type": c.parent.type, "id": c.parent.ID}
                         if c.HasField("parent") and c.parent.ID else None),
              "save_path": c.savePath, "created": c.created} for c in caches]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    rows = [("ID", "SUBTYPE", "SIZE", "PARENT", "CREATED")]
    for c in found:
        parent = c["parent"]
        rows.append((c["id"], c["subtype"], _size(c["size"]),
                     f"{parent['type']}/{parent['id']}" if parent else "-",
                     _time(c["created"])))
    _table(rows)
    click.echo(_count(len(found), "cache"))


@cli.command()
@click.argument("subtype", default="")
@click.option("--type", "pool_type", default=ENCLAVE_POOL, show_default=True,
              help="The pool type.")
@click.option("--yes", "-y", is_flag=True,
              help="Empty every subtype without asking.")
@click.pass_obj
@_reaching
def flush(socket_path, subtype, pool_type, yes):
    """Close every available enclave (of SUBTYPE only, when given).

    With a bundle cache --type, delete its caches instead; a cache with
    child caches is kept. Emptying every subtype asks first, unless --yes;
    a subtype's flush does not ask.
    """
    if pool_type != ENCLAVE_POOL:
        _flush_caches(socket_path, pool_type, subtype, yes)
        return
    with Client(socket_path) as client:
        if not subtype and not yes:
            # Ask the daemon first: an unreachable daemon is told at once,
            # and the question says what would go.
            count = sum(1 for e in client.list("", pool_type)
                        if e.state in ("available", "", None))
            if not click.confirm(f"Close {_count(count, 'available enclave')} "
                                 "of every subtype?", err=True):
                raise _Abort("flush not confirmed; nothing closed")
        # One call for the whole pool, not a round trip per enclave.
        from epm_client.admin import AdminClient
        with AdminClient(socket_path) as admin:
            deleted, kept = admin.flush(subtype)
    where = f" of subtype {subtype}" if subtype else ""
    click.echo(f"flushed {_count(deleted, 'enclave')}{where}"
               + (f"; {kept} in use kept" if kept else ""))


def _flush_caches(socket_path, pool_type, subtype, yes):
    """Delete the bundle caches of ``pool_type``, those that can go.

    A cache is never in use the way an enclave is (LoadCache copies it),
    but one with child caches holds their data in its directory: the daemon
    refuses to delete it, and it is counted as kept.
    """
    from epm_client.admin import AdminClient
    with AdminClient(socket_path) as admin:
        caches = admin.caches(pool_type, subtype)
    if not subtype and not yes:
        if not click.confirm(f"Delete {_count(len(caches), 'cache')} of type "
                             f"{pool_type}, every subtype?", err=True):
            raise _Abort("flush not confirmed; nothing deleted")
    deleted = kept = 0
    with Client(socket_path) as client:
        for cache in caches:
            try:
                client.delete(cache.ID, cache.subType, pool_type)
                deleted += 1
            except errors.NotFound:
                pass
            except errors.FailedPrecondition:
                kept += 1
    where = f" of subtype {subtype}" if subtype else ""
    click.echo(f"deleted {_count(deleted, 'cache')}{where}"
               + (f"; {kept} with child caches kept" if kept else ""))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON, not a table.")
@click.pass_obj
@_reaching
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
@_reaching
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
@_reaching
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
