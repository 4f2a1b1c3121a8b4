"""Build ``liberpal-skeleton-v<N>.so`` with cffi's embedding mode.

    python -m skeleton.capi.build --version 3 --out build/liberpal-skeleton-v3.so

The library embeds this interpreter's version of Python. The interpreter's
home, and a sys.path made of this checkout and the virtual environment's
site-packages, are baked into it: a host sets no PYTHONPATH or PYTHONHOME,
and the library finds the project wherever it is installed, as long as this
checkout and its environment stay where they were at build time.
"""

import argparse
import compileall
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile

import cffi

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
VERSIONS = (1, 2, 3)
# The packages the library imports from this checkout. Their bytecode is
# written at build time: the library never writes it (a container start must
# not write into the host's tree), and compiling them at every load would
# cost several milliseconds a container.
PACKAGES = ("skeleton", "epm_client", "epm_api")

# What the Python side implements; glue.c declares the same functions static.
CDEF = """
typedef struct { const char *args; const char *log_level; } pal_attr_v1_t;
typedef struct { pal_attr_v1_t attr_v1; int fd; uint64_t addr; } pal_attr_v3_t;
typedef struct { int stdin, stdout, stderr; } pal_stdio_fds;
typedef struct {
    char *path; char **argv; char **env; pal_stdio_fds *stdio; int *pid;
} pal_create_process_args;
typedef struct { int pid; int *exit_value; } pal_exec_args;

extern "Python" int _epm_boot(int version);
extern "Python" int _epm_init(const char *args, const char *log_level, int fd,
                              uint64_t addr);
extern "Python" int _epm_run(char *path, char **argv, pal_stdio_fds *stdio,
                             int *exit_code);
extern "Python" int _epm_create_process(pal_create_process_args *args);
extern "Python" int _epm_exec(int pid, int *exit_value);
extern "Python" int _epm_kill(int pid, int sig);
extern "Python" int _epm_get_local_report(void *targetinfo, int targetinfo_len,
                                          void *report, int *report_len);
extern "Python" int _epm_destroy(void);

int epm_spawn_workload(uint64_t entry, int out, int err, unsigned int wait_s);
"""

# Runs once, in the library's constructor.
INIT_CODE = """
from {module} import ffi, lib
from skeleton.capi import entry
entry.bind(ffi, lib, {version})
"""


def module_name(version):
    """The cffi module inside the library (a C identifier, unlike the file)."""
    return f"_epm_pal_v{version}"


def python_path():
    """The sys.path baked into the library: this checkout, then the stdlib and
    the environment's site-packages, without the build's working directory."""
    paths = [str(REPO)]
    for entry in sys.path:
        if entry and os.path.isdir(entry) and entry not in paths \
                and os.path.realpath(entry) != os.path.realpath(os.getcwd()):
            paths.append(entry)
    return ":".join(paths)


def _c_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build(version, out, path=None):
    """Compile the library for PAL API ``version`` to the path ``out``.

    ``path`` replaces the baked-in sys.path (tests build a broken library).
    """
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.embedding_init_code(INIT_CODE.format(module=module_name(version),
                                             version=version))
    libdir = sysconfig.get_config_var("LIBDIR")
    source = (f"#define PAL_VERSION {version}\n"
              f"#define EPM_PYTHON_HOME {_c_string(sys.base_prefix)}\n"
              f"#define EPM_PYTHON_PATH {_c_string(path or python_path())}\n"
              + (HERE / "glue.c").read_text())
    ffi.set_source(
        module_name(version), source,
        extra_compile_args=["-fvisibility=hidden", "-Wno-unused-function"],
        extra_link_args=[f"-Wl,-rpath,{libdir}",
                         f"-Wl,--version-script={HERE / 'exports.map'}"],
        libraries=["dl"])
    out = pathlib.Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="epm-pal-build-") as tmp:
        built = ffi.compile(tmpdir=tmp, target=out.name, verbose=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(built, out)
    compile_packages()
    return out


def compile_packages():
    """Write the bytecode of the packages the library imports; returns True
    when every module compiled."""
    return all([compileall.compile_dir(str(REPO / package), quiet=1)
                for package in PACKAGES])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, choices=VERSIONS, required=True,
                        help="the PAL API version")
    parser.add_argument("--out", required=True, help="the library to write")
    args = parser.parse_args(argv)
    build(args.version, args.out)


if __name__ == "__main__":
    main()
