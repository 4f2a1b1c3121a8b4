"""The skeleton's C declarations, generated ahead of time (skeleton.ffi_build).

The PAL imports the skeleton in every container it starts, so importing it
must not import pycparser nor parse a declaration.
"""

import subprocess
import sys

from skeleton import ffi_build, native


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)


def test_importing_the_skeleton_parses_no_declaration():
    done = _python("import sys, skeleton.pal, skeleton.backends.sgx, skeleton.cpu\n"
                   "print(sorted(m for m in sys.modules\n"
                   "             if m.split('.')[0] in ('cffi', 'pycparser')))")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_missing_generated_module_says_to_run_make():
    done = _python("import sys; sys.modules['skeleton._ffi'] = None\n"
                   "import skeleton.enclave")

    assert done.returncode != 0
    assert "ImportError: skeleton/_ffi.py is missing: run `make`" in done.stderr


def test_a_module_generated_from_other_declarations_is_refused():
    done = _python("import sys, types\n"
                   "stale = types.ModuleType('skeleton._ffi'); stale.CDEF = 'int x;'\n"
                   "sys.modules['skeleton._ffi'] = stale\n"
                   "import skeleton.enclave")

    assert done.returncode != 0
    assert "out of date with skeleton/ffi_build.py: run `make`" in done.stderr


def test_the_generated_module_is_what_the_build_writes(tmp_path):
    ffi_build.build(tmp_path / "_ffi.py")

    with open(ffi_build.DEFAULT_OUT) as f:
        assert (tmp_path / "_ffi.py").read_text() == f.read()


def test_libc_and_the_driver_structures_are_declared():
    assert native.ffi.sizeof("struct sgx_enclave_run") == 256
    assert native.libc.getauxval(33) != 0  # AT_SYSINFO_EHDR: the vDSO
