/*
 * Runs the enclave image's entry stub natively, outside any enclave, playing
 * the CPU's part in ENCLU: the test's stand-in for SGX hardware.
 *
 * EENTER is a jump to OENTRY with RBX = the TCS address and RCX = the
 * address to return to, as the SDM defines it (Vol. 3D, 38.4 EENTER). The
 * stub's ENCLU faults outside an enclave: #UD (SIGILL) on some machines,
 * #GP (SIGSEGV) on others, such as a guest whose CPU hides SGX; the
 * handler, installed for both, plays
 * EREPORT (leaf 0: checks the operands, writes a stand-in REPORT holding the
 * TARGETINFO's MRENCLAVE and the report data) and EEXIT (leaf 4: continues at
 * RBX). What it saw is printed as JSON.
 *
 * Usage: eenter_stub IMAGE OP; ECALL 1 reads TARGETINFO and report data
 * (576 bytes) from stdin.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

uint64_t host_rsp, landing;
static uint8_t *image;
static size_t image_size;
static int ereports, eexits, other;
static uint64_t report_operands[3], body_rsp;
static uint64_t exit_rsp, exit_rbx, exit_regs[8];

static int inside(uint64_t addr, size_t size)
{
	return addr >= (uint64_t)image && addr + size <= (uint64_t)image + image_size;
}

static void on_enclu(int sig, siginfo_t *info, void *context)
{
	greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
	const uint8_t *rip = (const uint8_t *)r[REG_RIP];

	(void)sig;
	(void)info;
	if (memcmp(rip, "\x0f\x01\xd7", 3) != 0) {
		other++;
		_exit(3);
	}
	if (r[REG_RAX] == 0) {
		uint8_t *report = (uint8_t *)r[REG_RDX];

		ereports++;
		report_operands[0] = r[REG_RBX];
		report_operands[1] = r[REG_RCX];
		report_operands[2] = r[REG_RDX];
		body_rsp = r[REG_RSP];
		memset(report, 0, 432);
		memcpy(report + 64, (void *)r[REG_RBX], 32);
		memcpy(report + 320, (void *)r[REG_RCX], 64);
		r[REG_RIP] += 3;
	} else if (r[REG_RAX] == 4) {
		eexits++;
		exit_rsp = r[REG_RSP];
		exit_rbx = r[REG_RBX];
		exit_regs[0] = r[REG_RCX];
		exit_regs[1] = r[REG_RDX];
		exit_regs[2] = r[REG_RDI];
		exit_regs[3] = r[REG_RSI];
		exit_regs[4] = r[REG_R8];
		exit_regs[5] = r[REG_R9];
		exit_regs[6] = r[REG_R10];
		exit_regs[7] = r[REG_R11];
		r[REG_RIP] = r[REG_RBX];
	} else {
		other++;
		_exit(4);
	}
}

static void eenter(uint64_t oentry, uint64_t tcs, uint64_t op, void *buf)
{
	__asm__ volatile("mov %%rsp, host_rsp(%%rip)\n\t"
			 "lea 1f(%%rip), %%rcx\n\t"
			 "mov %%rcx, landing(%%rip)\n\t"
			 "jmp *%%rax\n"
			 "1:"
			 : "+a"(oentry), "+b"(tcs), "+D"(op), "+S"(buf)
			 :
			 : "rcx", "rdx", "r8", "r9", "r10", "r11", "memory", "cc");
}

int main(int argc, char **argv)
{
	static uint8_t altstack[65536];
	stack_t ss = { .ss_sp = altstack, .ss_size = sizeof(altstack) };
	struct sigaction sa = { .sa_sigaction = on_enclu,
				.sa_flags = SA_SIGINFO | SA_ONSTACK };
	uint8_t buf[1008] = { 0 };
	uint64_t oentry, op = strtoull(argv[2], NULL, 0);
	FILE *f = fopen(argv[1], "rb");

	if (argc != 3 || f == NULL)
		return 2;
	image = mmap(NULL, 1 << 24, PROT_READ | PROT_WRITE | PROT_EXEC,
		     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	image_size = fread(image, 1, 1 << 24, f);
	fclose(f);
	if (op == 1 && fread(buf, 1, 576, stdin) != 576)
		return 2;
	sigaltstack(&ss, NULL);
	sigaction(SIGILL, &sa, NULL);
	sigaction(SIGSEGV, &sa, NULL);
	memcpy(&oentry, image + 32, 8);

	eenter((uint64_t)image + oentry, (uint64_t)image, op, buf);

	printf("{\"ereports\": %d, \"eexits\": %d, \"other\": %d,"
	       " \"exit_rsp_is_host_rsp\": %d, \"exit_to_landing\": %d,"
	       " \"scrubbed\": %d,", ereports, eexits, other,
	       exit_rsp == host_rsp, exit_rbx == landing,
	       !(exit_regs[0] | exit_regs[1] | exit_regs[2] | exit_regs[3] |
		 exit_regs[4] | exit_regs[5] | exit_regs[6] | exit_regs[7]));
	printf(" \"body_stack_in_enclave\": %d,"
	       " \"operands_in_enclave\": %d, \"operands_aligned\": %d,",
	       inside(body_rsp, 8),
	       inside(report_operands[0], 512) && inside(report_operands[1], 64)
	       && inside(report_operands[2], 432),
	       report_operands[0] % 512 == 0 && report_operands[1] % 128 == 0
	       && report_operands[2] % 512 == 0);
	printf(" \"buffer\": \"");
	for (size_t i = 0; i < sizeof(buf); i++)
		printf("%02x", buf[i]);
	printf("\"}\n");
	return 0;
}
