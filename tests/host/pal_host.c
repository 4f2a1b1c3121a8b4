/* A PAL host that knows nothing of Python, driving liberpal-skeleton-v<N>.so
 * the way rune does (DESIGN.md section 6): dlopen with RTLD_LOCAL, change
 * root, then get_version, init, and per process create_process + exec (v1:
 * exec), kill, destroy. The workload's stdio are pipes. Results go to stdout
 * as key=value lines for tests/test_capi.py.
 *
 *   pal_host -l LIB -V VERSION [-r ROOT] [-a ARGS] [-L LEVEL] [-f FD -A ADDR]
 *            [-w SECONDS] [-t] [-b] [-R]
 *
 * -r chroot into ROOT after loading; -f/-A pass an enclave (v3); -w makes
 * the workload wait and kills it with SIGTERM; -t makes every call from a
 * second thread; -b calls everything before pal_init; -R asks for reports.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct { const char *args; const char *log_level; } pal_attr_v1_t;
typedef struct { pal_attr_v1_t attr_v1; int fd; uint64_t addr; } pal_attr_v3_t;
typedef struct { int stdin, stdout, stderr; } pal_stdio_fds;
typedef struct {
    char *path; char **argv; char **env; pal_stdio_fds *stdio; int *pid;
} pal_create_process_args;
typedef struct { int pid; int *exit_value; } pal_exec_args;

static struct {
    int (*get_version)(void);
    int (*init)(void *attr);
    int (*exec_v1)(char *, char **, pal_stdio_fds *, int *);
    int (*create_process)(pal_create_process_args *);
    int (*exec)(pal_exec_args *);
    int (*kill)(int, int);
    int (*get_local_report)(void *, int, void *, int *);
    int (*destroy)(void);
} pal;

static struct {
    const char *lib, *root, *args, *level;
    int version, fd, wait_s, threaded, before, report;
    uint64_t addr;
} opt = { .args = "", .level = "", .fd = -1 };

static int taskfd = -1;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void *sym(void *handle, const char *name, int needed)
{
    void *p = dlsym(handle, name);
    if (p == NULL && needed) {
        printf("error=missing symbol %s\n", name);
        exit(2);
    }
    return p;
}

static void print_escaped(const char *key, const char *buf, size_t len)
{
    printf("%s=", key);
    for (size_t i = 0; i < len; i++) {
        if (buf[i] == '\n')
            fputs("\\n", stdout);
        else
            putchar(buf[i]);
    }
    putchar('\n');
}

/* Read what is left in a pipe whose write end is closed (bounded). */
static void drain(const char *key, int fd, const char *already, size_t have)
{
    char buf[4096];
    size_t len = have;
    ssize_t n;

    memcpy(buf, already, have);
    while (len < sizeof(buf) && (n = read(fd, buf + len, sizeof(buf) - len)) > 0)
        len += (size_t)n;
    print_escaped(key, buf, len);
}

/* The host process's threads, counted through /proc opened before chroot. */
static void print_threads(void)
{
    int dupfd = dup(taskfd);
    DIR *dir;
    struct dirent *d;
    int count = 0;

    lseek(dupfd, 0, SEEK_SET);
    dir = fdopendir(dupfd);
    if (dir == NULL)
        return;
    printf("thread_names=");
    while ((d = readdir(dir)) != NULL) {
        char path[300], name[32] = "";
        int fd;
        ssize_t n;
        if (d->d_name[0] == '.')
            continue;
        count++;
        snprintf(path, sizeof(path), "%s/comm", d->d_name);
        fd = openat(taskfd, path, O_RDONLY);
        if (fd >= 0) {
            n = read(fd, name, sizeof(name) - 1);
            name[n > 0 ? n - 1 : 0] = '\0';
            close(fd);
        }
        printf("%s,", name);
    }
    printf("\nthreads=%d\n", count);
    closedir(dir);
}

static void before_init(void)
{
    int exit_code;
    pal_exec_args exec_args = { 1, &exit_code };

    if (opt.version == 1) {
        printf("before_exec=%d\n", pal.exec_v1("/bin/skeleton", NULL, NULL,
                                                &exit_code));
    } else {
        printf("before_exec=%d\n", pal.exec(&exec_args));
        printf("before_kill=%d\n", pal.kill(-1, SIGCHLD));
    }
    if (pal.get_local_report != NULL) {
        char ti[512], report[432];
        int len = sizeof(report);
        printf("before_report=%d\n", pal.get_local_report(ti, 512, report, &len));
    }
    printf("before_destroy=%d\n", pal.destroy());
}

static void reports(void)
{
    static char ti[512], report[1024];
    int len = 100;

    printf("report_short=%d\n", pal.get_local_report(ti, 512, report, &len));
    len = sizeof(report);
    printf("report_bad_targetinfo=%d\n", pal.get_local_report(ti, 100, report, &len));
    len = sizeof(report);
    printf("report=%d\n", pal.get_local_report(ti, 512, report, &len));
    printf("report_len=%d\n", len);
}

static void *run(void *unused)
{
    pal_attr_v3_t attr = { { opt.args, opt.level }, opt.fd, opt.addr };
    int out[2], err[2], rc, exit_value = -1000, pid = -1;
    char wait_s[16];
    char *argv[] = { "skeleton", "wait_timeout", wait_s, NULL };
    char *env[] = { NULL };
    pal_stdio_fds stdio;
    char greeting[256];
    size_t have = 0;
    double started;

    (void)unused;
    snprintf(wait_s, sizeof(wait_s), "%d", opt.wait_s);
    if (opt.before)
        before_init();
    printf("version=%d\n", pal.get_version());
    started = now_ms();
    rc = pal.init(&attr);
    printf("init=%d\ninit_ms=%.3f\n", rc, now_ms() - started);
    if (rc != 0)
        return NULL;
    if (pipe(out) || pipe(err)) {
        perror("pipe");
        exit(2);
    }
    stdio = (pal_stdio_fds){ 0, out[1], err[1] };
    if (opt.version == 1) {
        rc = pal.exec_v1("/bin/skeleton", argv, &stdio, &exit_value);
        printf("exec=%d\nexit=%d\n", rc, exit_value);
    } else {
        pal_create_process_args args = { "/bin/skeleton", argv, env, &stdio, &pid };
        pal_exec_args exec_args = { 0, &exit_value };
        printf("create=%d\n", pal.create_process(&args));
        printf("pid_is_child=%d\n", pid > 0 && getpgid(pid) >= 0);
        print_threads();
        printf("kill_sigchld=%d\n", pal.kill(-1, SIGCHLD));
        if (opt.wait_s > 0) {
            /* The greeting first: then the workload is surely waiting. */
            struct pollfd p = { out[0], POLLIN, 0 };
            ssize_t n;
            while (memchr(greeting, '\n', have) == NULL && poll(&p, 1, 10000) > 0
                   && (n = read(out[0], greeting + have,
                                sizeof(greeting) - have)) > 0)
                have += (size_t)n;
            printf("kill_stranger=%d\n", pal.kill(getpid(), SIGTERM));
            printf("kill=%d\n", pal.kill(pid, SIGTERM));
        }
        exec_args.pid = pid;
        rc = pal.exec(&exec_args);
        printf("exec=%d\nexit=%d\n", rc, exit_value);
    }
    close(out[1]);
    close(err[1]);
    drain("stdout", out[0], greeting, have);
    drain("stderr", err[0], "", 0);
    if (opt.report)
        reports();
    printf("destroy=%d\n", pal.destroy());
    return NULL;
}

int main(int argc, char **argv)
{
    void *handle;
    double started;
    int c;

    while ((c = getopt(argc, argv, "l:V:r:a:L:f:A:w:tbR")) != -1) {
        switch (c) {
        case 'l': opt.lib = optarg; break;
        case 'V': opt.version = atoi(optarg); break;
        case 'r': opt.root = optarg; break;
        case 'a': opt.args = optarg; break;
        case 'L': opt.level = optarg; break;
        case 'f': opt.fd = atoi(optarg); break;
        case 'A': opt.addr = strtoull(optarg, NULL, 0); break;
        case 'w': opt.wait_s = atoi(optarg); break;
        case 't': opt.threaded = 1; break;
        case 'b': opt.before = 1; break;
        case 'R': opt.report = 1; break;
        default: return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    started = now_ms();
    handle = dlopen(opt.lib, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        printf("error=%s\n", dlerror());
        return 2;
    }
    printf("dlopen_ms=%.3f\n", now_ms() - started);
    pal.get_version = sym(handle, "pal_get_version", 1);
    pal.init = sym(handle, "pal_init", 1);
    pal.destroy = sym(handle, "pal_destroy", 1);
    if (opt.version == 1) {
        pal.exec_v1 = sym(handle, "pal_exec", 1);
    } else {
        pal.create_process = sym(handle, "pal_create_process", 1);
        pal.exec = sym(handle, "pal_exec", 1);
        pal.kill = sym(handle, "pal_kill", 1);
    }
    pal.get_local_report = sym(handle, "pal_get_local_report", opt.version == 3);

    taskfd = open("/proc/self/task", O_RDONLY | O_DIRECTORY);
    if (opt.root != NULL && (chroot(opt.root) != 0 || chdir("/") != 0)) {
        perror("chroot");
        return 2;
    }
    if (opt.threaded) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, run, NULL) != 0
            || pthread_join(thread, NULL) != 0)
            return 2;
    } else {
        run(NULL);
    }
    return 0;
}
