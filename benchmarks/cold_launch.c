/* One cold launch, as rune does it: a fresh process dlopens the PAL library
 * (which starts Python and imports the launch path), then calls
 * pal_get_version, pal_init and pal_destroy. The working directory holds
 * encl.bin and encl.ss. Prints key=value lines for benchmarks/run.py.
 *
 *   cold_launch LIBRARY ARGS
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

typedef struct { const char *args; const char *log_level; } pal_attr_v1_t;
typedef struct { pal_attr_v1_t attr_v1; int fd; uint64_t addr; } pal_attr_v3_t;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(int argc, char **argv)
{
    pal_attr_v3_t attr = { { "", "error" }, -1, 0 };
    int (*get_version)(void), (*init)(void *), (*destroy)(void);
    double t0, t1, t2, t3;
    void *handle;
    int rc;

    if (argc != 3) {
        fprintf(stderr, "usage: %s LIBRARY ARGS\n", argv[0]);
        return 2;
    }
    attr.attr_v1.args = argv[2];
    t0 = now_ms();
    handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        printf("error=%s\n", dlerror());
        return 2;
    }
    t1 = now_ms();
    get_version = (int (*)(void))dlsym(handle, "pal_get_version");
    init = (int (*)(void *))dlsym(handle, "pal_init");
    destroy = (int (*)(void))dlsym(handle, "pal_destroy");
    if (get_version == NULL || init == NULL || destroy == NULL) {
        printf("error=missing symbol\n");
        return 2;
    }
    if (get_version() != 3) {
        printf("error=not a v3 PAL\n");
        return 2;
    }
    rc = init(&attr);
    t2 = now_ms();
    printf("init=%d\n", rc);
    if (rc != 0)
        return 1;
    rc = destroy();
    t3 = now_ms();
    printf("destroy=%d\ndlopen_ms=%.3f\ninit_ms=%.3f\ndestroy_ms=%.3f\n",
           rc, t1 - t0, t2 - t1, t3 - t2);
    return rc == 0 ? 0 : 1;
}
