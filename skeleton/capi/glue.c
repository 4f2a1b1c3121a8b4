/* The C side of liberpal-skeleton-v<PAL_VERSION>.so (DESIGN.md section 6).
 *
 * skeleton/capi/build.py defines PAL_VERSION, EPM_PYTHON_HOME and
 * EPM_PYTHON_PATH (a colon-separated sys.path) before this file, and cffi
 * places it after Python.h. The exported pal_* functions are plain C: they
 * check that the embedded interpreter started, then call the static
 * extern "Python" functions that skeleton/capi/entry.py attaches.
 */
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAL_EXPORT __attribute__((visibility("default")))
#define PAL_NAME "liberpal-skeleton"
/* skeleton.enclave.GREETING_BUFFER: ECALL 0 writes at most this much. */
#define GREETING_BUFFER 256

typedef struct { const char *args; const char *log_level; } pal_attr_v1_t;
typedef struct { pal_attr_v1_t attr_v1; int fd; uint64_t addr; } pal_attr_v3_t;
typedef struct { int stdin, stdout, stderr; } pal_stdio_fds;
typedef struct {
    char *path; char **argv; char **env; pal_stdio_fds *stdio; int *pid;
} pal_create_process_args;
typedef struct { int pid; int *exit_value; } pal_exec_args;

static int _epm_boot(int version);
static int _epm_init(const char *args, const char *log_level, int fd,
                     uint64_t addr);
static int _epm_run(char *path, char **argv, pal_stdio_fds *stdio,
                    int *exit_code);
static int _epm_create_process(pal_create_process_args *args);
static int _epm_exec(int pid, int *exit_value);
static int _epm_kill(int pid, int sig);
static int _epm_get_local_report(void *targetinfo, int targetinfo_len,
                                 void *report, int *report_len);
static int _epm_destroy(void);

/* Set by the constructor only when the interpreter started and entry.py
 * attached every function. cffi answers a call into Python that failed to
 * start with 0, which would look like success; this flag is what stops it. */
static int epm_ready;

static int not_ready(const char *call)
{
    fprintf(stderr, "%s-v%d: %s: the embedded Python runtime did not start "
            "when the library was loaded (see the messages above)\n",
            PAL_NAME, PAL_VERSION, call);
    return -ELIBACC;
}

/* rune dlopens the library before pivot_root and calls pal_init after it,
 * when nothing of the host may be visible: the interpreter starts and every
 * module the launch path needs is imported here, at load time. */
static int start_python(void)
{
    PyStatus status;
    PyConfig config;
    char paths[] = EPM_PYTHON_PATH;
    char *saveptr = NULL;

    /* Isolated: the container's PYTHONPATH, PYTHONHOME and user site must not
     * change what the PAL runs. sys.path is the one baked in at build time. */
    PyConfig_InitIsolatedConfig(&config);
    config.install_signal_handlers = 0;
    config.site_import = 0;
    config.write_bytecode = 0;
    config.module_search_paths_set = 1;
    status = PyConfig_SetBytesString(&config, &config.home, EPM_PYTHON_HOME);
    for (char *p = strtok_r(paths, ":", &saveptr);
         p != NULL && !PyStatus_Exception(status);
         p = strtok_r(NULL, ":", &saveptr)) {
        wchar_t *wide = Py_DecodeLocale(p, NULL);
        if (wide == NULL) {
            status = PyStatus_NoMemory();
            break;
        }
        status = PyWideStringList_Append(&config.module_search_paths, wide);
        PyMem_RawFree(wide);
    }
    if (!PyStatus_Exception(status))
        status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        fprintf(stderr, "%s-v%d: cannot start Python (home %s): %s\n",
                PAL_NAME, PAL_VERSION, EPM_PYTHON_HOME,
                status.err_msg ? status.err_msg : "unknown error");
        return -1;
    }
    PyEval_SaveThread();  /* cffi takes the GIL for each call */
    return 0;
}

__attribute__((constructor)) static void epm_pal_load(void)
{
    Dl_info info;

    /* A host that dlopens with RTLD_LOCAL keeps libpython's symbols out of
     * the global scope, where Python's own extension modules look for them:
     * promote the copy we were linked with. */
    if (!dladdr((void *)&Py_InitializeFromConfig, &info)
        || dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL) == NULL) {
        fprintf(stderr, "%s-v%d: cannot make libpython global: %s\n",
                PAL_NAME, PAL_VERSION, dlerror());
        return;
    }
    if (!Py_IsInitialized() && start_python() < 0)
        return;
    epm_ready = _epm_boot(PAL_VERSION) == 1;
    if (!epm_ready)
        fprintf(stderr, "%s-v%d: the PAL's Python side did not load\n",
                PAL_NAME, PAL_VERSION);
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        buf += n;
        len -= (size_t)n;
    }
}

/* The workload of pal_create_process, in a child that runs no Python: after
 * fork only async-signal-safe calls and the enclave's own code, so the child
 * cannot wait on a lock (the GIL, an allocator's, a runtime thread's) that
 * some other thread of the host held at the time of the fork. */
static int epm_spawn_workload(uint64_t entry, int out, int err,
                              unsigned int wait_s)
{
    char greeting[GREETING_BUFFER];
    struct timespec left = { (time_t)wait_s, 0 };
    sigset_t none;
    pid_t pid = fork();

    if (pid != 0)
        return pid < 0 ? -errno : pid;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    memset(greeting, 0, sizeof(greeting));
    ((void (*)(uint64_t, void *))(uintptr_t)entry)(0, greeting);
    greeting[sizeof(greeting) - 1] = '\0';
    write_all(out, greeting, strlen(greeting));
    write_all(out, "\n", 1);
    while (nanosleep(&left, &left) < 0 && errno == EINTR)
        ;
    write_all(err, "the skeleton workload ran successfully\n", 39);
    _exit(0);
}

PAL_EXPORT int pal_get_version(void)
{
    if (!epm_ready)
        return not_ready("pal_get_version");
    return PAL_VERSION;
}

#if PAL_VERSION == 3
PAL_EXPORT int pal_init(pal_attr_v3_t *attr)
#else
PAL_EXPORT int pal_init(pal_attr_v1_t *attr)
#endif
{
    if (!epm_ready)
        return not_ready("pal_init");
    if (attr == NULL)
        return _epm_init(NULL, NULL, -1, 0);
#if PAL_VERSION == 3
    return _epm_init(attr->attr_v1.args, attr->attr_v1.log_level, attr->fd,
                     attr->addr);
#else
    return _epm_init(attr->args, attr->log_level, -1, 0);
#endif
}

#if PAL_VERSION == 1
PAL_EXPORT int pal_exec(char *path, char *argv[], pal_stdio_fds *stdio,
                        int *exit_code)
{
    if (!epm_ready)
        return not_ready("pal_exec");
    return _epm_run(path, argv, stdio, exit_code);
}
#else
PAL_EXPORT int pal_create_process(pal_create_process_args *args)
{
    if (!epm_ready)
        return not_ready("pal_create_process");
    return _epm_create_process(args);
}

PAL_EXPORT int pal_exec(pal_exec_args *attr)
{
    if (!epm_ready)
        return not_ready("pal_exec");
    if (attr == NULL)
        return _epm_exec(0, NULL);
    return _epm_exec(attr->pid, attr->exit_value);
}

PAL_EXPORT int pal_kill(int pid, int sig)
{
    if (!epm_ready)
        return not_ready("pal_kill");
    return _epm_kill(pid, sig);
}
#endif

#if PAL_VERSION == 3
PAL_EXPORT int pal_get_local_report(void *targetinfo, int targetinfo_len,
                                    void *report, int *report_len)
{
    if (!epm_ready)
        return not_ready("pal_get_local_report");
    return _epm_get_local_report(targetinfo, targetinfo_len, report, report_len);
}
#endif

PAL_EXPORT int pal_destroy(void)
{
    if (!epm_ready)
        return not_ready("pal_destroy");
    return _epm_destroy();
}
