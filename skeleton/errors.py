"""The skeleton's exceptions: one hierarchy, each message names what failed."""


class SkeletonError(Exception):
    """Base of every error the skeleton raises on purpose."""


class ImageError(SkeletonError):
    """``encl.bin`` or ``encl.ss`` is missing or malformed."""


class SigningError(SkeletonError):
    """``sgxsign`` refused its options, key or image."""


class EinitError(SkeletonError):
    """EINIT refused the enclave, as hardware would."""


class BackendError(SkeletonError):
    """The requested backend cannot run here."""


class MappingConflict(SkeletonError):
    """An address of the enclave's layout is already mapped in this process."""
