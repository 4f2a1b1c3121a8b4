/*
 * The skeleton enclave. Page 0 is its Thread Control Structure (Intel SDM
 * Vol. 3D, 34.8); the loader adds it as a TCS page after moving OSSA and OENTRY
 * by the image's offset in the enclave (DESIGN §5). The code is position
 * independent and needs no relocation, because nothing in the enclave could
 * apply one: the image is measured exactly as the linker wrote it.
 */
#include <stddef.h>
#include <stdint.h>

#define ECALL_INIT 0
#define ECALL_REPORT 1

struct tcs {
	uint64_t state;
	uint64_t flags;
	uint64_t ossa;
	uint32_t cssa;
	uint32_t nssa;
	uint64_t oentry;
	uint64_t aep;
	uint64_t ofsbase;
	uint64_t ogsbase;
	uint32_t fslimit;
	uint32_t gslimit;
	uint8_t reserved[4024];
};

_Static_assert(sizeof(struct tcs) == 4096, "a TCS is one page");

void encl_entry(uint64_t op, void *buf);

/* One thread with one SSA frame; OSSA is filled in by the signer and loader. */
__attribute__((section(".tcs"), aligned(4096), used))
const struct tcs encl_tcs = {
	.nssa = 1,
	.oentry = (uint64_t)encl_entry,
	.fslimit = 0xfff,
	.gslimit = 0xfff,
};

static const char greeting[] = "Hello Inclavare Containers!";

/*
 * ECALL 0 copies the greeting, NUL included, into the host's buffer, which must
 * hold sizeof(greeting) bytes. ECALL 1 (EREPORT) has no effect yet: it needs
 * the report path of a later issue.
 */
void encl_entry(uint64_t op, void *buf)
{
	char *out = buf;

	if (op != ECALL_INIT)
		return;
	for (size_t i = 0; i < sizeof(greeting); i++)
		out[i] = greeting[i];
}
