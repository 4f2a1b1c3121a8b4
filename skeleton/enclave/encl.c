/*
 * The skeleton enclave. Page 0 is its Thread Control Structure (Intel SDM
 * Vol. 3D, 34.8); the loader adds it as a TCS page after moving OSSA and OENTRY
 * by the image's offset in the enclave (DESIGN §5). OENTRY is encl_entry
 * (entry.S), which EENTER runs; it calls encl_body here. The code is position
 * independent and needs no relocation, because nothing in the enclave could
 * apply one: the image is measured exactly as the linker wrote it.
 */
#include <stddef.h>
#include <stdint.h>

#define ECALL_INIT 0
#define ECALL_REPORT 1
#define ENCLU_EREPORT 0
#define TARGETINFO_SIZE 512
#define REPORT_DATA_SIZE 64
#define REPORT_SIZE 432

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

void encl_entry(void);
void encl_body(uint64_t op, void *buf);

/* One thread with one SSA frame; OSSA is filled in by the signer and loader. */
__attribute__((section(".tcs"), aligned(4096), used))
const struct tcs encl_tcs = {
	.nssa = 1,
	.oentry = (uint64_t)encl_entry,
	.fslimit = 0xfff,
	.gslimit = 0xfff,
};

/*
 * The entry record, at the start of the page after the TCS (encl.lds): where
 * encl_body is, as an offset from the image start. Hardware never reads it.
 * The sim backend, which cannot run ENCLU, calls encl_body through it instead
 * of entering at OENTRY (skeleton.structs.ENTRY_RECORD).
 */
struct entry_record {
	char magic[8];
	uint64_t body;
};

__attribute__((section(".entry_record"), used))
const struct entry_record encl_entry_record = {
	.magic = "EPMBODY",
	.body = (uint64_t)encl_body,
};

/* ECALL 1's host buffer: TARGETINFO and report data in, the REPORT out. */
struct report_call {
	uint8_t targetinfo[TARGETINFO_SIZE];
	uint8_t report_data[REPORT_DATA_SIZE];
	uint8_t report[REPORT_SIZE];
};

/*
 * EREPORT's operands must be enclave memory with these alignments (SDM Vol.
 * 3D, 38.4 EREPORT: TARGETINFO and REPORT 512 bytes, REPORTDATA 128), so the
 * host's bytes are copied in and the REPORT copied out.
 */
static uint8_t targetinfo[TARGETINFO_SIZE] __attribute__((aligned(512)));
static uint8_t report_data[REPORT_DATA_SIZE] __attribute__((aligned(128)));
static uint8_t report[REPORT_SIZE] __attribute__((aligned(512)));

static const char greeting[] = "Hello Inclavare Containers!";

static void copy(uint8_t *to, const uint8_t *from, size_t size)
{
	for (size_t i = 0; i < size; i++)
		to[i] = from[i];
}

static void ereport(struct report_call *call)
{
	copy(targetinfo, call->targetinfo, sizeof(targetinfo));
	copy(report_data, call->report_data, sizeof(report_data));
	__asm__ volatile("enclu"
			 : : "a"(ENCLU_EREPORT), "b"(targetinfo),
			   "c"(report_data), "d"(report)
			 : "memory");
	copy(call->report, report, sizeof(report));
}

/*
 * ECALL 0 copies the greeting, NUL included, into the host's buffer, which must
 * hold sizeof(greeting) bytes. ECALL 1 runs EREPORT for the TARGETINFO and
 * report data in the host's struct report_call and writes the REPORT after
 * them; it needs hardware, so sim never calls it (sim computes the REPORT in
 * Python, skeleton.report). Other numbers do nothing.
 *
 * The host's buffer is trusted to lie outside the enclave: this skeleton does
 * not check it, as an enclave holding secrets would have to.
 */
void encl_body(uint64_t op, void *buf)
{
	if (op == ECALL_INIT)
		copy(buf, (const uint8_t *)greeting, sizeof(greeting));
	else if (op == ECALL_REPORT)
		ereport(buf);
}
