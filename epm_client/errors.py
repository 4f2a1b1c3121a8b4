"""The client's exceptions, one per failure a caller may want to tell apart.

The daemon reports failures as gRPC status codes (on the hand-off socket, as
the same code numbers); ``from_code`` maps both back to these classes. The
mapping goes by number so that the hand-off path never imports grpc, which
costs about 90 ms in a process that starts for every container.
"""


class EpmError(Exception):
    """Any failure reported by, or talking to, the epm daemon."""


class DaemonUnavailable(EpmError):
    """The daemon cannot be reached: not running, or its socket is missing."""


class InvalidArgument(EpmError):
    """The daemon refused a request as malformed."""


class NotFound(EpmError):
    """No pool entry or cache has that ID."""


class AlreadyExists(EpmError):
    """A pool entry or cache with that ID exists already."""


class PermissionDenied(EpmError):
    """The daemon does not serve this process's user or group."""


class ResourceExhausted(EpmError):
    """The pool is full for this identity or in total."""


class FailedPrecondition(EpmError):
    """The entry is in a state that does not allow the request."""


class ProtocolError(EpmError):
    """The daemon's reply broke the protocol (a bug on one side)."""


# gRPC status codes by number (grpc/include/grpc/impl/codegen/status.h).
STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)
_BY_NUMBER = {
    STATUS_NAMES.index("UNAVAILABLE"): DaemonUnavailable,
    STATUS_NAMES.index("INVALID_ARGUMENT"): InvalidArgument,
    STATUS_NAMES.index("NOT_FOUND"): NotFound,
    STATUS_NAMES.index("ALREADY_EXISTS"): AlreadyExists,
    STATUS_NAMES.index("PERMISSION_DENIED"): PermissionDenied,
    STATUS_NAMES.index("RESOURCE_EXHAUSTED"): ResourceExhausted,
    STATUS_NAMES.index("FAILED_PRECONDITION"): FailedPrecondition,
}


def from_code(code, message):
    """The exception for a gRPC status code (a grpc.StatusCode or its number)."""
    number = code.value[0] if isinstance(getattr(code, "value", None), tuple) \
        else int(code)
    cls = _BY_NUMBER.get(number, EpmError)
    name = STATUS_NAMES[number] if 0 <= number < len(STATUS_NAMES) else str(number)
    if cls is not EpmError:
        # A status without details still says what it is.
        return cls(message or name.lower().replace("_", " "))
    return cls(f"{name}: {message}" if message else name)


def from_rpc_error(error):
    """The exception for a ``grpc.RpcError`` raised by a stub call."""
    return from_code(error.code(), error.details() or "")
