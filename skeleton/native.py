"""The C declarations the skeleton calls, and libc: ``ffi`` and ``libc``.

They come from ``skeleton/_ffi.py``, which ``make`` generates with
``python -m skeleton.ffi_build`` (cffi's out-of-line ABI mode), so importing
this module neither imports pycparser nor parses a declaration: it matters
because the PAL imports the skeleton in every container it starts.
"""

from skeleton.ffi_build import CDEF

try:
    from skeleton import _ffi
except ModuleNotFoundError as e:
    if e.name != "skeleton._ffi":
        raise
    raise ImportError("skeleton/_ffi.py is missing: run `make` (or `python -m "
                      "skeleton.ffi_build`) to generate it") from None
if getattr(_ffi, "CDEF", None) != CDEF:
    raise ImportError("skeleton/_ffi.py is out of date with skeleton/ffi_build.py: "
                      "run `make` (or `python -m skeleton.ffi_build`)")

ffi = _ffi.ffi
libc = ffi.dlopen(None)
