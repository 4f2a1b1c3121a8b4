/*
 * The enclave's entry point: the TCS's OENTRY. Hardware EENTER lands here
 * with RBX = the TCS's address, RCX = the address after the host's ENCLU
 * (where EEXIT must return), RAX = the current SSA index, and the host's
 * RDI, RSI, RDX, R8 and R9 untouched (SDM Vol. 3D, 38.4 EENTER; the kernel's
 * __vdso_sgx_enter_enclave passes them through). Our convention: RDI = the
 * ECALL number, RSI = the host buffer, as for encl_body(op, buf).
 *
 * The stub runs the C body on a stack inside the enclave, so nothing the
 * enclave computes is pushed to host memory, then scrubs the registers the
 * body may have left secrets in and leaves with EEXIT (leaf 4) to RCX as it
 * was at entry. The body follows the C ABI, so RBP and R12-R15 come back as
 * the host gave them, which __vdso_sgx_enter_enclave relies on for RBP.
 * This follows the kernel selftest's bootstrap (tools/testing/selftests/sgx/
 * test_encl_bootstrap.S). It cannot run outside an enclave (ENCLU raises
 * #UD there): the sim backend calls encl_body directly, found through the
 * entry record in encl.c.
 */
	.section .text.entry, "ax"
	.global encl_entry
	.type encl_entry, @function
encl_entry:
	lea	encl_stack_top(%rip), %rax
	xchg	%rsp, %rax		/* RAX = the host's RSP */
	push	%rax
	push	%rcx			/* where EEXIT returns */

	call	encl_body		/* RDI = ECALL number, RSI = buffer */

	pop	%rbx			/* EEXIT's target is RBX */
	pop	%rax
	mov	%rax, %rsp

	xor	%ecx, %ecx
	xor	%edx, %edx
	xor	%edi, %edi
	xor	%esi, %esi
	xor	%r8d, %r8d
	xor	%r9d, %r9d
	xor	%r10d, %r10d
	xor	%r11d, %r11d
	add	%rdx, %rdx		/* clear OF, SF, AF and CF */

	mov	$4, %eax		/* ENCLU[EEXIT] */
	enclu
	ud2
	.size encl_entry, . - encl_entry

/* One thread (one TCS), so one stack; the host's stack is never used. */
	.section .bss.encl_stack, "aw", @nobits
	.balign 4096
	.space 8192
encl_stack_top:

	.section .note.GNU-stack, "", @progbits
