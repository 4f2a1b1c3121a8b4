"""Cache IDs: they become file names in shared directories, so few are allowed."""

import re

from epm_server.errors import InvalidArgument, shown

# No "/", no "..", no NUL, nothing a shell or a path would read specially.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_id(cache_id, field="ID"):
    """Return ``cache_id`` if it is 1..64 of ``[A-Za-z0-9_-]``.

    Raises InvalidArgument naming the field.
    """
    if not _ID.fullmatch(cache_id):
        raise InvalidArgument(f"{field}: {shown(cache_id, quoted=True)} is not 1 to 64 characters "
                              "of A-Z a-z 0-9 _ -")
    return cache_id


def is_id(name):
    """Return True when ``name`` is a valid cache ID (a legacy socket's name)."""
    return _ID.fullmatch(name) is not None
