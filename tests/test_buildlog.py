"""Build log reading: objects compiled, normalised warnings and their delta, first error.

Warning text comes from the real gcc on this machine (compiled in a temporary source tree);
the kbuild lines are the format of scripts/Makefile.build's quiet commands.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kpatchtest.build import buildlog as B

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

KBUILD = """\
  SYNC    include/config/auto.conf.cmd
  HOSTCC  scripts/basic/fixdep
  HOSTCC  scripts/kconfig/conf.o
  HOSTLD  scripts/kconfig/conf
  WRAP    arch/x86/include/generated/uapi/asm/bpf_perf_event.h
  UPD     include/generated/utsrelease.h
  CC      scripts/mod/empty.o
  CC      kernel/bounds.s
  CC      arch/x86/kernel/asm-offsets.s
  CALL    scripts/checksyscalls.sh
  DESCEND objtool
  CC      /tmp/out/tools/objtool/libstring.o
  LINK    /tmp/out/tools/objtool/objtool
  AS      arch/x86/entry/entry_64.o
  CC      arch/x86/kvm/../../../virt/kvm/kvm_main.o
  CC      arch/x86/kvm/mmu/tdp_mmu.o
  CC [M]  arch/x86/kvm/svm/svm.o
  AS [M]  arch/x86/kvm/svm/vmenter.o
  AR      arch/x86/kvm/built-in.a
  LD [M]  arch/x86/kvm/kvm-amd.o
  GEN     .version
  LD      vmlinux.o
  MODPOST vmlinux.symvers
  CC [M]  arch/x86/kvm/kvm-amd.mod.o
  OBJCOPY arch/x86/boot/vmlinux.bin
  BUILD   arch/x86/boot/bzImage
Kernel: arch/x86/boot/bzImage is ready  (#1)
"""


def test_objects_compiled_counts_cc_and_as_only():
    # CC/AS of .o files (built-in and [M]); not HOSTCC, .s asm-offsets, AR, LD, GEN, nor
    # objtool's own objects (tools/ builds them with absolute paths)
    assert B.objects_compiled(KBUILD) == 7
    assert B.objects_compiled("") == 0
    assert B.objects_compiled(KBUILD.replace("\n", "\r\n")) == 7
    assert B.objects_compiled("  LD      vmlinux\n  HOSTCC  scripts/sorttable\n") == 0


SRC_V1 = """\
static inline int helper(int v)
{
\tint unused;
\treturn v;
}

int kvm_thing(void)
{
\tint x;
\treturn helper(x);
}
"""

# the "patch": two lines added at the top (shifts everything) and a new unused variable
SRC_V2 = """\
/* a comment */
/* another */
static inline int helper(int v)
{
\tint unused;
\treturn v;
}

int kvm_thing(void)
{
\tint x;
\tint fresh;
\treturn helper(x);
}
"""

HEADER = "static inline int hdr_fn(void) { int y; return 0; }\n"


def gcc_log(tree: Path, src: str, *, outdir: Path | None = None, relative: bool = False) -> str:
    """Compile arch/x86/kvm/thing.c (including include/linux/hdr.h) the way kbuild does:
    the path gcc sees is absolute, or "../..." from an O= build directory inside the
    source tree (kbuild then sets srctree to "..")."""
    (tree / "arch/x86/kvm").mkdir(parents=True, exist_ok=True)
    (tree / "include/linux").mkdir(parents=True, exist_ok=True)
    (tree / "include/linux/hdr.h").write_text(HEADER)
    (tree / "arch/x86/kvm/thing.c").write_text('#include <linux/hdr.h>\n' + src)
    cwd = outdir or tree
    cwd.mkdir(parents=True, exist_ok=True)
    srcpath = "../arch/x86/kvm/thing.c" if relative else str(tree / "arch/x86/kvm/thing.c")
    incdir = "../include" if relative else str(tree / "include")
    r = subprocess.run(["gcc", "-Wall", "-c", srcpath, "-I", incdir, "-o", "/dev/null"], cwd=cwd,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert r.returncode == 0, r.stderr
    return "  CC      arch/x86/kvm/thing.o\n" + r.stderr


@needs_gcc
def test_warnings_real_gcc_normalised(tmp_path):
    log = gcc_log(tmp_path / "src", SRC_V1)
    assert "In function \u2018helper\u2019" in log or "In function 'helper'" in log  # real gcc context line
    ws = B.warnings(log)
    assert B.CompilerWarning("arch/x86/kvm/thing.c", "helper", "unused variable 'unused'",
                             "-Wunused-variable") in ws
    assert B.CompilerWarning("include/linux/hdr.h", "hdr_fn", "unused variable 'y'", "-Wunused-variable") in ws
    assert any(w.function == "kvm_thing" and w.flag == "-Wuninitialized" and "'x'" in w.message for w in ws)
    assert all(":" not in w.file and not w.file.startswith("/") for w in ws)
    assert B.Warning is B.CompilerWarning


@needs_gcc
def test_warnings_from_o_build_dir_and_given_trees(tmp_path):
    rel = B.warnings(gcc_log(tmp_path / "src", SRC_V1, outdir=tmp_path / "src" / "build", relative=True))
    ab = B.warnings(gcc_log(tmp_path / "src", SRC_V1), trees=[str(tmp_path / "src")])
    assert rel == ab and rel
    assert {w.file for w in rel} == {"arch/x86/kvm/thing.c", "include/linux/hdr.h"}


@needs_gcc
def test_new_warnings_tolerant_of_line_shifts(tmp_path):
    base = B.warnings(gcc_log(tmp_path / "a" / "src", SRC_V1))
    patched = B.warnings(gcc_log(tmp_path / "b" / "src", SRC_V2))  # other tree, shifted lines
    new = B.new_warnings(base, patched)
    assert new == [B.CompilerWarning("arch/x86/kvm/thing.c", "kvm_thing", "unused variable 'fresh'",
                                     "-Wunused-variable")]
    assert B.new_warnings(base, base) == []
    assert B.new_warnings(patched, base) == []


@needs_gcc
def test_inlined_from_context(tmp_path):
    src = tmp_path / "arch/x86/kvm/b.c"
    src.parent.mkdir(parents=True)
    src.write_text("#include <string.h>\nstatic inline void fill(char *d, int n) { memset(d, 0, n); }\n"
                   "void caller(void);\nchar out[4];\nvoid caller(void) { fill(out, 8); }\n")
    r = subprocess.run(["gcc", "-O2", "-Wall", "-c", str(src), "-o", "/dev/null"], capture_output=True, text=True)
    if "inlined from" not in r.stderr:
        pytest.skip("this gcc does not report the inlined memset overflow")
    ws = B.warnings(r.stderr)
    assert [w.function for w in ws] == ["fill (inlined from caller)"]
    assert ws[0].file == "arch/x86/kvm/b.c"


# verbatim from `make O=/tmp/kcfg/linux-source-6.1-kvm arch/x86/kvm/mmu/tdp_mmu.o` on Debian's
# 6.1.192 (tinyconfig + configs/x86_64-base.config + kvm.config), with an unused variable added
REAL_KBUILD_WARNING = """\
make[1]: Entering directory '/tmp/kcfg/linux-source-6.1-kvm'
  GEN     Makefile
  DESCEND objtool
  CALL    /tmp/ksrc-full/linux-source-6.1/scripts/checksyscalls.sh
  CC      arch/x86/kvm/mmu/tdp_mmu.o
/tmp/ksrc-full/linux-source-6.1/arch/x86/kvm/mmu/tdp_mmu.c: In function \u2018kvm_tdp_mmu_get_vcpu_root_hpa\u2019:
/tmp/ksrc-full/linux-source-6.1/arch/x86/kvm/mmu/tdp_mmu.c:231:13: warning: unused variable \u2018kpt_unused\u2019 [-Wunused-variable]
  231 |         int kpt_unused;
      |             ^~~~~~~~~~
make[1]: Leaving directory '/tmp/kcfg/linux-source-6.1-kvm'
"""


def test_real_kbuild_output():
    assert B.objects_compiled(REAL_KBUILD_WARNING) == 1
    expected = [B.CompilerWarning("arch/x86/kvm/mmu/tdp_mmu.c", "kvm_tdp_mmu_get_vcpu_root_hpa",
                                  "unused variable 'kpt_unused'", "-Wunused-variable")]
    assert B.warnings(REAL_KBUILD_WARNING) == expected  # prefix found without being told
    assert B.warnings(REAL_KBUILD_WARNING, trees=["/tmp/ksrc-full/linux-source-6.1"]) == expected
    assert B.first_error(REAL_KBUILD_WARNING) is None


def test_warnings_dedupe_and_misc_formats():
    log = """\
  CC      arch/x86/kvm/x86.o
/home/u/linux/arch/x86/kvm/x86.c: In function 'kvm_arch_vcpu_ioctl':
/home/u/linux/arch/x86/kvm/x86.c:5012:7: warning: unused variable 'r' [-Wunused-variable]
 5012 |   int r;
      |       ^
/home/u/linux/arch/x86/kvm/x86.c:5012:7: warning: unused variable 'r' [-Wunused-variable]
/home/u/linux/arch/x86/kvm/x86.c: At top level:
/home/u/linux/arch/x86/kvm/x86.c:9000:12: warning: 'dead' defined but not used [-Wunused-function]
arch/x86/kvm/vmx/vmenter.o: warning: objtool: __vmx_vcpu_run+0x1c2: call without frame pointer save/setup
make[2]: warning: jobserver unavailable: using -j1.  Add '+' to parent make rule.
"""
    ws = B.warnings(log)
    assert ws == [
        B.CompilerWarning("arch/x86/kvm/x86.c", "kvm_arch_vcpu_ioctl", "unused variable 'r'", "-Wunused-variable"),
        B.CompilerWarning("arch/x86/kvm/x86.c", None, "'dead' defined but not used", "-Wunused-function"),
        B.CompilerWarning("arch/x86/kvm/vmx/vmenter.o", None,
                          "objtool: __vmx_vcpu_run: call without frame pointer save/setup", None),
    ]
    # objtool offsets move with the code like line numbers do
    moved = log.replace("+0x1c2", "+0x1d0").replace(":5012:", ":5020:")
    assert B.new_warnings(ws, B.warnings(moved)) == []


ERROR_LOG = """\
  CC      arch/x86/kvm/mmu/mmu.o
  CC      arch/x86/kvm/mmu/tdp_mmu.o
arch/x86/kvm/mmu/tdp_mmu.c: In function 'kvm_tdp_mmu_get_vcpu_root_hpa':
arch/x86/kvm/mmu/tdp_mmu.c:251:9: error: 'root' undeclared (first use in this function)
  251 |  return root;
      |         ^~~~
arch/x86/kvm/mmu/tdp_mmu.c:251:9: note: each undeclared identifier is reported only once for each function it appears in
make[4]: *** [scripts/Makefile.build:250: arch/x86/kvm/mmu/tdp_mmu.o] Error 1
make[3]: *** [scripts/Makefile.build:500: arch/x86/kvm] Error 2
make[2]: *** [scripts/Makefile.build:500: arch/x86] Error 2
make[1]: *** [/src/Makefile:1992: .] Error 2
make: *** [Makefile:231: __sub-make] Error 2
"""


def test_first_error_compiler():
    e = B.first_error(ERROR_LOG, context=2)
    lines = e.splitlines()
    assert lines[2] == "arch/x86/kvm/mmu/tdp_mmu.c:251:9: error: 'root' undeclared (first use in this function)"
    assert len(lines) == 5 and lines[0] == "  CC      arch/x86/kvm/mmu/tdp_mmu.o"


def test_first_error_make_only_and_none():
    log = ("  LD      vmlinux.o\nld: vmlinux.o: in function `kvm_mmu_load':\n"
           "mmu.c:(.text+0x1b2): undefined reference to `kvm_tdp_mmu_gone'\n"
           "make[1]: *** [scripts/Makefile.vmlinux:34: vmlinux] Error 1\nmake: *** [Makefile:1250: vmlinux] Error 2\n")
    e = B.first_error(log, context=10)
    assert "undefined reference" in e and e.splitlines()[-2].startswith("make[1]: *** [")
    assert B.first_error(KBUILD) is None
    cfg = "scripts/kconfig/Makefile:96: *** No configuration exists for this target on this architecture.  Stop.\n"
    assert B.first_error(cfg) == cfg.strip()


@needs_gcc
def test_first_error_real_gcc(tmp_path):
    src = tmp_path / "e.c"
    src.write_text("int g(void) { return 1 }\n")
    r = subprocess.run(["gcc", "-c", str(src), "-o", "/dev/null"], capture_output=True, text=True)
    assert r.returncode != 0
    e = B.first_error("  CC      e.o\n" + r.stderr + "make: *** [Makefile:1: e.o] Error 1\n", context=1)
    assert "error: expected" in e.splitlines()[1]
