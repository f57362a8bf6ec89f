"""Kernel splat scanner: real report shapes (6.1-era x86), console and dmesg forms."""

from __future__ import annotations

import textwrap

import pytest

from kpatchtest.lab.splats import normalise, scan


def console(text: str, start: float = 1.0) -> str:
    """Serial-console form: '[    1.234567] ' timestamps and CR LF line ends."""
    lines = textwrap.dedent(text).strip("\n").split("\n")
    return "".join(f"[{start + i * 0.000113:12.6f}] {line}\r\n" for i, line in enumerate(lines))


WARN = """\
------------[ cut here ]------------
WARNING: CPU: 0 PID: 1 at arch/x86/kvm/mmu/tdp_mmu.c:1234 kvm_tdp_mmu_put_root+0x1a/0x130
Modules linked in:
CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.192 #1
Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1 04/01/2014
RIP: 0010:kvm_tdp_mmu_put_root+0x1a/0x130
Code: 0f 1f 44 00 00 41 55 41 54 55 48 89 fd 53 48 89 f3 <0f> 0b 48 8b 45 00 48 85 c0
RSP: 0018:ffffc90000013d88 EFLAGS: 00010246
RAX: 0000000000000000 RBX: ffff888003a1c000 RCX: 0000000000000000
RDX: 0000000000000001 RSI: ffff888003a1c000 RDI: ffff888004a1c000
Call Trace:
 <TASK>
 kvm_mmu_free_roots+0x12b/0x1a0
 kvm_mmu_reset_context+0x1a/0x30
 kvm_vcpu_ioctl+0x2b1/0x6f0
 </TASK>
---[ end trace 0000000000000000 ]---
"""

WARN_WITH_MESSAGE = """\
------------[ cut here ]------------
kvm: unexpected root refcount 0
WARNING: CPU: 1 PID: 142 at arch/x86/kvm/mmu/tdp_mmu.c:88 kvm_tdp_mmu_put_root+0x120/0x130
Modules linked in: kvm_amd kvm irqbypass
CPU: 1 PID: 142 Comm: qemu-system-x86 Tainted: G        W          6.1.192 #1
---[ end trace 0000000000000000 ]---
"""

KASAN = """\
==================================================================
BUG: KASAN: slab-out-of-bounds in kvm_tdp_mmu_get_vcpu_root_hpa+0x2c4/0x310
Read of size 8 at addr ffff888004c3a1f8 by task qemu-system-x86/142

CPU: 1 PID: 142 Comm: qemu-system-x86 Not tainted 6.1.192 #1
Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1 04/01/2014
Call Trace:
 <TASK>
 dump_stack_lvl+0x34/0x48
 print_report+0x170/0x473
 kasan_report+0xad/0x130
 kvm_tdp_mmu_get_vcpu_root_hpa+0x2c4/0x310
 kvm_mmu_load+0x3c1/0x9a0
 </TASK>

Allocated by task 142:
 kasan_save_stack+0x1e/0x40
 __kasan_kmalloc+0x7f/0x90
 kvm_arch_vcpu_create+0x1c8/0x8e0

The buggy address belongs to the object at ffff888004c3a000
 which belongs to the cache kmalloc-512 of size 512
The buggy address is located 504 bytes inside of
 512-byte region [ffff888004c3a000, ffff888004c3a200)

Memory state around the buggy address:
 ffff888004c3a100: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
>ffff888004c3a180: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 fc
                                                                ^
==================================================================
Disabling lock debugging due to kernel taint
"""

LOCKDEP = """\
======================================================
WARNING: possible circular locking dependency detected
6.1.192 #1 Not tainted
------------------------------------------------------
qemu-system-x86/142 is trying to acquire lock:
ffff888004a1c0e8 (&kvm->mmu_lock){++++}-{2:2}, at: kvm_tdp_mmu_zap_invalidated_roots+0x3c/0x1b0

but task is already holding lock:
ffff888004a1c148 (&kvm->slots_lock){+.+.}-{3:3}, at: kvm_mmu_zap_all_fast+0x2a/0x1e0

which lock already depends on the new lock.


the existing dependency chain (in reverse order) is:

-> #1 (&kvm->slots_lock){+.+.}-{3:3}:
       __mutex_lock+0x8f/0x990
       kvm_set_memory_region+0x22/0x50

-> #0 (&kvm->mmu_lock){++++}-{2:2}:
       __lock_acquire+0x1203/0x1e70
       lock_acquire+0xc2/0x2b0

other info that might help us debug this:

 Possible unsafe locking scenario:

       CPU0                    CPU1
       ----                    ----
  lock(&kvm->slots_lock);
                               lock(&kvm->mmu_lock);
                               lock(&kvm->slots_lock);
  lock(&kvm->mmu_lock);

 *** DEADLOCK ***

2 locks held by qemu-system-x86/142:
stack backtrace:
CPU: 1 PID: 142 Comm: qemu-system-x86 Not tainted 6.1.192 #1
Call Trace:
 <TASK>
 dump_stack_lvl+0x45/0x5e
 check_noncircular+0xf5/0x110
 </TASK>
"""

RCU_USAGE = """\
=============================
WARNING: suspicious RCU usage
6.1.192 #1 Not tainted
-----------------------------
arch/x86/kvm/mmu/tdp_mmu.c:123 suspicious rcu_dereference_check() usage!
"""

RCU_STALL = """\
rcu: INFO: rcu_preempt self-detected stall on CPU
rcu: \t0-....: (20999 ticks this GP) idle=e7c4/1/0x4000000000000000 softirq=2210/2210 fqs=5164
\t(t=21000 jiffies g=1649 q=1131 ncpus=2)
NMI backtrace for cpu 0
CPU: 0 PID: 142 Comm: qemu-system-x86 Not tainted 6.1.192 #1
Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1 04/01/2014
Call Trace:
 <IRQ>
 dump_stack_lvl+0x34/0x48
 nmi_cpu_backtrace.cold+0x30/0x70
 rcu_dump_cpu_stacks+0xc4/0x100
 </IRQ>
"""

RCU_STALLS = """\
rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:
rcu: \t1-...!: (0 ticks this GP) idle=8e4c/0/0x1 softirq=1920/1920 fqs=0 (false positive?)
\t(detected by 0, t=21002 jiffies, g=1649, q=23 ncpus=2)
Sending NMI from CPU 0 to CPUs 1:
rcu: rcu_preempt kthread timer wakeup didn't happen for 20999 jiffies! g1649 f0x0 RCU_GP_WAIT_FQS(5) ->state=0x402
"""

PANIC = """\
Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)
CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.192 #1
Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1 04/01/2014
Call Trace:
 <TASK>
 dump_stack_lvl+0x34/0x48
 panic+0x108/0x2b8
 mount_block_root+0x13e/0x1e7
 prepare_namespace+0x13f/0x16e
 kernel_init_freeable+0x21c/0x241
 kernel_init+0x11/0x120
 ret_from_fork+0x22/0x30
 </TASK>
Kernel Offset: disabled
---[ end Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0) ]---
"""

NULL_DEREF_THEN_PANIC = """\
BUG: kernel NULL pointer dereference, address: 0000000000000008
#PF: supervisor read access in kernel mode
#PF: error_code(0x0000) - not-present page
PGD 0 P4D 0
Oops: 0000 [#1] PREEMPT SMP NOPTI
CPU: 1 PID: 142 Comm: qemu-system-x86 Not tainted 6.1.192 #1
Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1 04/01/2014
RIP: 0010:kvm_tdp_mmu_get_vcpu_root_hpa+0x4d/0x310
Call Trace:
 <TASK>
 kvm_mmu_load+0x3c1/0x9a0
 </TASK>
Modules linked in:
CR2: 0000000000000008
---[ end trace 0000000000000000 ]---
RIP: 0010:kvm_tdp_mmu_get_vcpu_root_hpa+0x4d/0x310
Kernel panic - not syncing: Fatal exception
Kernel Offset: disabled
---[ end Kernel panic - not syncing: Fatal exception ]---
"""

KERNEL_BUG_AT = """\
------------[ cut here ]------------
kernel BUG at arch/x86/kvm/mmu/mmu.c:2528!
invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
CPU: 0 PID: 142 Comm: qemu-system-x86 Not tainted 6.1.192 #1
RIP: 0010:kvm_mmu_free_roots+0x1e1/0x1f0
---[ end trace 0000000000000000 ]---
"""

GPF = """\
general protection fault, probably for non-canonical address 0xdffffc0000000001: 0000 [#1] PREEMPT SMP KASAN NOPTI
KASAN: null-ptr-deref in range [0x0000000000000008-0x000000000000000f]
CPU: 0 PID: 142 Comm: qemu-system-x86 Not tainted 6.1.192 #1
RIP: 0010:kvm_tdp_mmu_zap_leafs+0x9a/0x310
"""

HUNG_TASK = """\
INFO: task kworker/u4:1:37 blocked for more than 122 seconds.
      Not tainted 6.1.192 #1
"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.
task:kworker/u4:1    state:D stack:0     pid:37    ppid:2      flags:0x00004000
Workqueue: events_unbound async_run_entry_fn
"""

UBSAN = """\
================================================================================
UBSAN: shift-out-of-bounds in arch/x86/kvm/mmu/mmu.c:4567:23
shift exponent 64 is too large for 64-bit type 'long long unsigned int'
CPU: 0 PID: 142 Comm: qemu-system-x86 Not tainted 6.1.192 #1
================================================================================
"""

SOFT_LOCKUP = """\
watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [qemu-system-x86:142]
Modules linked in:
CPU: 1 PID: 142 Comm: qemu-system-x86 Not tainted 6.1.192 #1
"""

CLEAN_BOOT = """\
Linux version 6.1.192 (root@builder) (gcc (Debian 12.2.0-14) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC
Command line: console=ttyS0 panic=-1 oops=panic kvm.tdp_mmu=1 softlockup_panic=1
x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'
[Firmware Bug]: TSC_DEADLINE disabled due to Errata; please update microcode to version: 0x22 (or later)
Spectre V2 : WARNING: Unprivileged eBPF is enabled with eIBRS on, data leaks possible via Spectre v2 BHB attacks!
RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed attacks, data leaks possible!
ACPI BIOS Error (bug): Could not resolve symbol [\\_SB.PCI0.S08.PRES], AE_NOT_FOUND (20220331/dswload2-162)
Lock dependency validator: Copyright (c) 2006 Red Hat, Inc., Ingo Molnar
... MAX_LOCKDEP_SUBCLASSES:  8
rcu: Preemptible hierarchical RCU implementation.
rcu: \tRCU event tracing is enabled.
rcu: RCU calculated value of scheduler-enlistment delay is 100 jiffies.
kasan: KernelAddressSanitizer initialized
tsc: Marking TSC unstable due to check_tsc_sync_source failed
SVM: kvm: Nested Paging enabled
Warning: unable to open an initial console.
Run /init as init process
  with arguments:
    /init
WARNING: Unsupported kernel version 6.1.192, assuming defaults
BUG reports go to https://bugs.example.org
debug: bug=0 oops=0 panic=0
"""


def kinds(log: str) -> list[str]:
    return [s.kind for s in scan(log)]


@pytest.mark.parametrize("report,kind,header", [
    (WARN, "warning", "WARNING: CPU: 0 PID: 1 at arch/x86/kvm/mmu/tdp_mmu.c:1234"),
    (KASAN, "kasan", "BUG: KASAN: slab-out-of-bounds in kvm_tdp_mmu_get_vcpu_root_hpa"),
    (LOCKDEP, "lockdep", "WARNING: possible circular locking dependency detected"),
    (RCU_USAGE, "lockdep", "WARNING: suspicious RCU usage"),
    (RCU_STALL, "rcu-stall", "rcu: INFO: rcu_preempt self-detected stall on CPU"),
    (RCU_STALLS, "rcu-stall", "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"),
    (PANIC, "panic", "Kernel panic - not syncing: VFS: Unable to mount root fs"),
    (KERNEL_BUG_AT, "bug", "kernel BUG at arch/x86/kvm/mmu/mmu.c:2528!"),
    (GPF, "oops", "general protection fault, probably for non-canonical address"),
    (HUNG_TASK, "hung-task", "INFO: task kworker/u4:1:37 blocked for more than 122 seconds."),
    (UBSAN, "ubsan", "UBSAN: shift-out-of-bounds in arch/x86/kvm/mmu/mmu.c:4567:23"),
    (SOFT_LOCKUP, "bug", "watchdog: BUG: soft lockup - CPU#1 stuck for 26s!"),
])
@pytest.mark.parametrize("form", ["console", "dmesg", "plain"])
def test_each_report_is_one_splat(report: str, kind: str, header: str, form: str) -> None:
    log = {"console": console(report),
           "dmesg": "".join(f"[   12.{i:06d}] {line}\n" for i, line in enumerate(report.splitlines())),
           "plain": report}[form]
    splats = scan(log)
    assert [s.kind for s in splats] == [kind]
    s = splats[0]
    assert s.first_lines[0].startswith(header)
    assert not any("\r" in line or line.startswith("[") and "." in line[:14] for line in s.first_lines)
    assert len(s.first_lines) <= 9


def test_first_lines_are_header_plus_context_timestamps_stripped() -> None:
    log = console(CLEAN_BOOT) + console(WARN, start=5.0)
    [s] = scan(log, context=4)
    assert s.line_no == len(CLEAN_BOOT.splitlines()) + 2      # 1-based; after the cut-here line
    assert s.first_lines == [
        "WARNING: CPU: 0 PID: 1 at arch/x86/kvm/mmu/tdp_mmu.c:1234 kvm_tdp_mmu_put_root+0x1a/0x130",
        "Modules linked in:",
        "CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.192 #1",
        "Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1 04/01/2014",
        "RIP: 0010:kvm_tdp_mmu_put_root+0x1a/0x130",
    ]
    assert len(scan(log, context=0)[0].first_lines) == 1


def test_warn_message_before_warning_line_belongs_to_the_splat() -> None:
    [s] = scan(console(WARN_WITH_MESSAGE))
    assert s.kind == "warning"
    assert s.first_lines[:2] == [
        "kvm: unexpected root refcount 0",
        "WARNING: CPU: 1 PID: 142 at arch/x86/kvm/mmu/tdp_mmu.c:88 kvm_tdp_mmu_put_root+0x120/0x130"]
    assert s.line_no == 2


def test_bug_with_its_oops_is_one_report_and_the_panic_another() -> None:
    splats = scan(console(NULL_DEREF_THEN_PANIC))
    assert [s.kind for s in splats] == ["bug", "panic"]
    assert splats[0].first_lines[0] == "BUG: kernel NULL pointer dereference, address: 0000000000000008"
    assert "Oops: 0000 [#1] PREEMPT SMP NOPTI" in splats[0].first_lines
    assert splats[1].first_lines == ["Kernel panic - not syncing: Fatal exception",
                                     "Kernel Offset: disabled",
                                     "---[ end Kernel panic - not syncing: Fatal exception ]---"]


def test_first_lines_stop_at_the_next_report() -> None:
    splats = scan(console(HUNG_TASK + WARN), context=20)
    assert [s.kind for s in splats] == ["hung-task", "warning"]
    assert CUT_HERE_LINE not in splats[0].first_lines
    assert splats[0].first_lines[-1] == "Workqueue: events_unbound async_run_entry_fn"


CUT_HERE_LINE = "------------[ cut here ]------------"


def test_clean_boot_logs_have_no_splats() -> None:
    assert scan(CLEAN_BOOT) == []
    assert scan(console(CLEAN_BOOT)) == []
    assert scan("") == []
    # a lone cut-here marker with nothing after it is not a report
    assert scan(console(CLEAN_BOOT + CUT_HERE_LINE + "\n")) == []


def test_a_whole_boot_with_several_reports() -> None:
    log = console(CLEAN_BOOT + WARN + KASAN + LOCKDEP + RCU_STALL + CLEAN_BOOT + PANIC)
    assert kinds(log) == ["warning", "kasan", "lockdep", "rcu-stall", "panic"]


@pytest.mark.parametrize("line", [
    "<4>[    3.141592] BUG: KASAN: use-after-free in kvm_mmu_free_roots+0x1/0x2",   # dmesg -r
    "[Mon Jan  6 10:15:02 2025] BUG: KASAN: use-after-free in kvm_mmu_free_roots+0x1/0x2",  # dmesg -T
    "[    3.141592][  T142] BUG: KASAN: use-after-free in kvm_mmu_free_roots+0x1/0x2",  # PRINTK_CALLER
    "Jan 06 10:15:02 labbox kernel: BUG: KASAN: use-after-free in kvm_mmu_free_roots+0x1/0x2",
    "login: [   12.345678] BUG: KASAN: use-after-free in kvm_mmu_free_roots+0x1/0x2\r\r",  # console mix
])
def test_prefix_forms(line: str) -> None:
    [s] = scan(line + "\n")
    assert s.kind == "kasan"
    assert s.first_lines == ["BUG: KASAN: use-after-free in kvm_mmu_free_roots+0x1/0x2"]


def test_normalise() -> None:
    assert normalise("[    1.000001] Oops: 0000 [#1] SMP\r") == "Oops: 0000 [#1] SMP"
    assert normalise("plain text") == "plain text"
