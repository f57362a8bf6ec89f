# Helpers for the stand-in's fake test "kernels" (x86/*.flat are bash scripts).
# Sourced by each .flat; TESTNAME, ACCEL and KUT_STANDIN_SCENARIO come from the runner.

# serial LINE...: guest output on the serial port (QEMU -serial stdio gives CR LF)
serial() { local l; for l in "$@"; do printf '%s\r\n' "$l"; done; }

# qemu_stderr LINE...: messages from QEMU itself
qemu_stderr() { local l; for l in "$@"; do printf '%s\n' "$l" >&2; done; }

# debug_exit CODE: the test's exit(CODE) through isa-debug-exit: QEMU exits (CODE << 1) | 1
debug_exit() { exit $(( ($1 << 1) | 1 )); }

# boot NR_CPUS: what lib/x86 prints before main()
boot() {
    local n=${1:-1} i
    serial "enabling apic"
    for ((i = 1; i < n; i++)); do serial "enabling apic" "setup: CPU $i online"; done
    serial "smp: waiting for $((n - 1)) APs"
}

setup_vm() { serial "paging enabled" "cr0 = 80010011" "cr3 = 1045000" "cr4 = 20"; }

# scenario KEY: the value of KEY=VALUE in KUT_STANDIN_SCENARIO (comma-separated)
scenario() {
    local item
    local IFS=,
    for item in $KUT_STANDIN_SCENARIO; do
        [ "${item%%=*}" = "$1" ] && { echo "${item#*=}"; return 0; }
    done
    return 1
}

hang() { exec sleep 100000; }

crash() {   # QEMU dies of SIGSEGV (no core file)
    ulimit -c 0
    kill -SEGV $$
    sleep 10
}

unhandled_gp() {   # an unexpected #GP in the guest: lib/x86 dumps state and calls abort()
    serial "Unhandled exception 13 #GP(0) at ip 0000000000401f6c" \
        "error_code=0000      rflags=00010002      cs=00000008" \
        "rax=0000000000000000 rcx=00000000c0000100 rdx=aaaaaaaa rbx=0000000000000000" \
        "rbp=000000000042cf98 rsi=0000000000000000 rdi=0000000000000000" \
        " r8=0000000000000000  r9=00000000000003f8 r10=000000000000000d r11=0000000000000000" \
        "r12=0000000000000000 r13=0000000000000000 r14=0000000000000000 r15=0000000000000000" \
        "cr0=0000000080010011 cr2=0000000000000000 cr3=0000000001045000 cr4=0000000000000020" \
        "cr8=0000000000000000" \
        "	STACK: @401f6c 4001ad"
    debug_exit 63    # abort(): QEMU exits 127
}

# behave WHAT: a generic outcome, for scenarios that override a test
behave() {
    case "$1" in
        pass) boot 1; serial "PASS: stand-in check" "SUMMARY: 1 tests"; debug_exit 0 ;;
        fail) boot 1; serial "PASS: stand-in check" "FAIL: stand-in forced failure" \
                  "SUMMARY: 2 tests, 1 unexpected failures"; debug_exit 1 ;;
        skip) boot 1; serial "SKIP: stand-in forced skip" "SUMMARY: 1 tests, 1 skipped"; debug_exit 38 ;;
        hang) boot 1; hang ;;
        crash) boot 1; crash ;;
        abort) boot 1; unhandled_gp ;;
        reset) boot 1; exit 0 ;;     # triple fault with --no-reboot: QEMU exits 0
        qemu-error) qemu_stderr "qemu-system-x86_64: Failed to get \"write\" lock"; exit 1 ;;
        *) echo "stand-in: unknown behaviour '$1'" >&2; exit 2 ;;
    esac
}

# standin_begin: apply KUT_STANDIN_SCENARIO to this test (call first in every .flat)
standin_begin() {
    local what target
    if target=$(scenario splat) && [ "$target" = "$TESTNAME" ] && [ -n "$KUT_STANDIN_DMESG" ]; then
        {
            echo "[  812.442791] ------------[ cut here ]------------"
            echo "[  812.442795] WARNING: CPU: 1 PID: 2291 at arch/x86/kvm/mmu/tdp_mmu.c:1163 kvm_tdp_mmu_map+0x5a1/0x6c0"
            echo "[  812.442861] Modules linked in:"
            echo "[  812.442870] CPU: 1 PID: 2291 Comm: qemu-system-x86 Not tainted 6.1.192 #1"
            echo "[  812.442902] RIP: 0010:kvm_tdp_mmu_map+0x5a1/0x6c0"
            echo "[  812.443310] ---[ end trace 0000000000000000 ]---"
        } >> "$KUT_STANDIN_DMESG"
    fi
    if what=$(scenario "$TESTNAME"); then
        behave "$what"
    fi
}
