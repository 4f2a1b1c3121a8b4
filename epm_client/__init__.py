"""The epm client library, used by the skeleton runtime and by epmctl."""

from epm_client.client import CheckedOut, Client, PoolEntry, default_socket
from epm_client.errors import (AlreadyExists, DaemonUnavailable, EpmError,
                               FailedPrecondition, InvalidArgument, NotFound,
                               PermissionDenied, ProtocolError,
                               ResourceExhausted)
from epm_client.types import ENCLAVE_POOL, Identity, LayoutEntry

__all__ = [
    "AlreadyExists", "CheckedOut", "Client", "DaemonUnavailable",
    "ENCLAVE_POOL", "EpmError", "FailedPrecondition", "Identity",
    "InvalidArgument", "LayoutEntry", "NotFound", "PermissionDenied",
    "PoolEntry", "ProtocolError", "ResourceExhausted", "default_socket",
]
