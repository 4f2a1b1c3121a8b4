"""The daemon's errors: one hierarchy, each class carrying its status code.

The code is a gRPC status number. The hand-off protocol puts the same numbers
in ``HandoffReply.code``, so the core can name a failure without knowing
either transport; ``service.py`` turns the number into a gRPC status.
"""


class EpmError(Exception):
    """Base of every error the daemon reports to a client."""

    code = 13  # INTERNAL


class InvalidArgument(EpmError):
    """A request field has a bad value; the message names the field."""

    code = 3


class NotFound(EpmError):
    """No pool entry has the requested ID."""

    code = 5


class AlreadyExists(EpmError):
    """A pool entry (or legacy socket path) with this ID exists already."""

    code = 6


class PermissionDenied(EpmError):
    """The peer may not use the socket or act on this entry."""

    code = 7


class ResourceExhausted(EpmError):
    """A capacity limit (pool size, connection count) is reached."""

    code = 8


class FailedPrecondition(EpmError):
    """The entry is not in a state that allows the operation."""

    code = 9


class Unavailable(EpmError):
    """The operation failed for a transient reason (a peer went away)."""

    code = 14


class ConfigError(Exception):
    """The configuration file is missing, unreadable or has a bad key."""


# A message travels back as gRPC metadata, which has a size limit: echoing a
# megabyte a client sent would turn our answer into RESOURCE_EXHAUSTED.
SHOWN_LIMIT = 80


def shown(value, quoted=False, limit=SHOWN_LIMIT):
    """Return a client's ``value`` for a message, cut after ``limit`` characters.

    A cut value ends with ``...(N chars)``, N its full length; ``quoted``
    puts what is shown in Python quotes, as ``!r`` would.
    """
    text = str(value)
    head = repr(text[:limit]) if quoted else text[:limit]
    return head if len(text) <= limit else f"{head}...({len(text)} chars)"
