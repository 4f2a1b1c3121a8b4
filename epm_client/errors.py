"""The client's exceptions, one per failure a caller may want to tell apart.

The daemon reports failures as gRPC status codes (on the hand-off socket, as
the same code numbers); ``from_code`` maps both back to these classes.
"""

import grpc


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


_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: DaemonUnavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}
_BY_NUMBER = {code.value[0]: cls for code, cls in _BY_CODE.items()}


def from_code(code, message):
    """The exception for a gRPC status code (enum or number) and message."""
    if isinstance(code, grpc.StatusCode):
        cls = _BY_CODE.get(code, EpmError)
        name = code.name
    else:
        cls = _BY_NUMBER.get(code, EpmError)
        name = next((c.name for c in grpc.StatusCode if c.value[0] == code),
                    str(code))
    return cls(f"{name}: {message}" if cls is EpmError else message)


def from_rpc_error(error):
    """The exception for a ``grpc.RpcError`` raised by a stub call."""
    return from_code(error.code(), error.details() or "")
