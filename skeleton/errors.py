"""The skeleton's exceptions: one hierarchy, each message names what failed."""

import errno as _errno


class SkeletonError(Exception):
    """Base of every error the skeleton raises on purpose."""


class ImageError(SkeletonError):
    """``encl.bin`` or ``encl.ss`` is missing or malformed.

    ``errno`` is what a PAL returns for it, negated: ENOENT for a missing
    file, EISDIR for a directory, EFBIG for a file beyond what its format
    allows, EINVAL for anything else.
    """

    def __init__(self, message, errno=_errno.EINVAL):
        super().__init__(message)
        self.errno = errno


class SigningError(SkeletonError):
    """``sgxsign`` refused its options, key or image."""


class EinitError(SkeletonError):
    """EINIT refused the enclave, as hardware would."""


class BackendError(SkeletonError):
    """The requested backend cannot run here."""


class MappingConflict(SkeletonError):
    """An address of the enclave's layout is already mapped in this process."""
