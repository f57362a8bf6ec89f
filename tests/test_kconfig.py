"""Kconfig fragments: parsing, merge_config.sh semantics, verification, hashing, base kinds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kpatchtest.build import kconfig as K
from kpatchtest.errors import InputError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def frag(tmp_path: Path, name: str, text: str) -> K.Fragment:
    p = tmp_path / name
    p.write_text(text)
    return K.parse_fragment(p)


# --- parsing --------------------------------------------------------------------------

def test_parse_fragment_lines_comments_and_not_set(tmp_path):
    f = frag(tmp_path, "a.config", "# KVM bits\n\nCONFIG_KVM=y\n# CONFIG_KVM_WERROR is not set\n"
                                   'CONFIG_LOCALVERSION="-kpt"\nCONFIG_LOG_BUF_SHIFT=17\nCONFIG_PHYSICAL_START=0x1000000\n')
    assert [(s.symbol, s.value) for s in f.settings] == [
        ("KVM", "y"), ("KVM_WERROR", "n"), ("LOCALVERSION", '"-kpt"'), ("LOG_BUF_SHIFT", "17"),
        ("PHYSICAL_START", "0x1000000")]
    assert f.settings[0].source == f"{tmp_path / 'a.config'}:3"
    assert f.settings[1].source.endswith("a.config:4")
    assert f.settings[1].line == "# CONFIG_KVM_WERROR is not set"


@pytest.mark.parametrize("line", [
    "KVM=y",                       # no CONFIG_ prefix
    "CONFIG_KVM y",                # no '='
    "  CONFIG_KVM=y",              # indented
    "set CONFIG_KVM=y",
])
def test_bad_line_is_input_error_with_file_line(tmp_path, line):
    p = tmp_path / "bad.config"
    p.write_text(f"CONFIG_A=y\n# fine\n{line}\n")
    with pytest.raises(InputError) as ei:
        K.parse_fragment(p)
    assert f"{p}:3" in ei.value.message
    assert ei.value.hint


@pytest.mark.parametrize("line", ["CONFIG_KVM=y # built in", "CONFIG_KVM=", "CONFIG_LOCALVERSION=-kpt",
                                  'CONFIG_LOCALVERSION="unterminated'])
def test_bad_value_is_input_error_with_file_line(tmp_path, line):
    p = tmp_path / "v.config"
    p.write_text(f"{line}\n")
    with pytest.raises(InputError) as ei:
        K.parse_fragment(p)
    assert f"{p}:1" in ei.value.message


def test_missing_fragment_file(tmp_path):
    with pytest.raises(InputError) as ei:
        K.parse_fragment(tmp_path / "nope.config")
    assert "nope.config" in str(ei.value) and "does not exist" in str(ei.value)


def test_parse_config_full_file():
    text = ("#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86 6.1.192 Kernel Configuration\n#\n"
            "CONFIG_CC_VERSION_TEXT=\"gcc (Debian 12.2.0-14) 12.2.0\"\nCONFIG_KVM=m\n"
            "# CONFIG_KVM_WERROR is not set\nCONFIG_HZ=250\n")
    assert K.parse_config(text) == {"CC_VERSION_TEXT": '"gcc (Debian 12.2.0-14) 12.2.0"', "KVM": "m",
                                    "KVM_WERROR": "n", "HZ": "250"}


# --- merging --------------------------------------------------------------------------

def test_later_fragment_overrides_with_note(tmp_path):
    a = frag(tmp_path, "kvm.config", "CONFIG_KVM=y\nCONFIG_KVM_AMD=y\nCONFIG_KVM_INTEL=y\n")
    b = frag(tmp_path, "kvm-modules.config", "CONFIG_KVM=m\nCONFIG_KVM_AMD=y\n# CONFIG_KVM_INTEL is not set\n")
    m = K.merge_fragments([a, b])
    assert {s: v.value for s, v in m.settings.items()} == {"KVM": "m", "KVM_AMD": "y", "KVM_INTEL": "n"}
    assert m.settings["KVM"].source.endswith("kvm-modules.config:1")
    # same value again (KVM_AMD) is not a redefinition, as in merge_config.sh
    assert len(m.redefined) == 2
    assert m.redefined[0].startswith(f"Value of CONFIG_KVM is redefined by fragment {tmp_path / 'kvm-modules.config'}")
    assert "CONFIG_KVM=y" in m.redefined[0] and "CONFIG_KVM=m" in m.redefined[0]
    assert "# CONFIG_KVM_INTEL is not set" in m.redefined[1]


def test_order_matters(tmp_path):
    a = frag(tmp_path, "a.config", "CONFIG_X=y\n")
    b = frag(tmp_path, "b.config", "# CONFIG_X is not set\n")
    assert K.merge_fragments([a, b]).settings["X"].value == "n"
    assert K.merge_fragments([b, a]).settings["X"].value == "y"


def test_merged_text_keeps_unrelated_base_lines(tmp_path):
    base = ("#\n# Linux/x86 6.1.192 Kernel Configuration\n#\nCONFIG_64BIT=y\n# CONFIG_KVM is not set\n"
            "CONFIG_HZ_250=y\nCONFIG_KVM_AMD=m\n# CONFIG_KVM_GUEST is not set\n")
    m = K.merge_fragments([frag(tmp_path, "k.config", "CONFIG_KVM=y\nCONFIG_KVM_AMD=y\n")])
    text = K.merged_text(base, m)
    lines = text.splitlines()
    for kept in ["CONFIG_64BIT=y", "CONFIG_HZ_250=y", "# CONFIG_KVM_GUEST is not set",
                 "# Linux/x86 6.1.192 Kernel Configuration"]:
        assert kept in lines
    assert "# CONFIG_KVM is not set" not in lines and "CONFIG_KVM_AMD=m" not in lines
    assert lines.count("CONFIG_KVM=y") == 1 and lines.count("CONFIG_KVM_AMD=y") == 1
    assert lines.index("CONFIG_KVM=y") > lines.index("CONFIG_HZ_250=y")  # appended
    assert K.parse_config(text) == {"64BIT": "y", "HZ_250": "y", "KVM_GUEST": "n", "KVM": "y", "KVM_AMD": "y"}


# --- verification ---------------------------------------------------------------------

FINAL = """\
CONFIG_64BIT=y
CONFIG_VIRTUALIZATION=y
CONFIG_KVM=y
CONFIG_KVM_INTEL=y
# CONFIG_KVM_AMD is not set
CONFIG_PHYSICAL_START=0x1000000
"""


def test_verify_finds_dropped_and_changed(tmp_path):
    m = K.merge_fragments([frag(tmp_path, "f.config",
                                "CONFIG_VIRTUALIZATION=y\nCONFIG_KVM=y\nCONFIG_KVM_AMD=y\nCONFIG_KPROBES=y\n"
                                "# CONFIG_KVM_WERROR is not set\n# CONFIG_KVM_INTEL is not set\n"
                                "CONFIG_PHYSICAL_START=1000000\n")])
    got = {x.symbol: x for x in K.verify(m, FINAL)}
    assert set(got) == {"KVM_AMD", "KPROBES", "KVM_INTEL"}
    assert got["KVM_AMD"].requested == "y" and got["KVM_AMD"].actual == "n"
    assert got["KPROBES"].actual is None          # absent: unknown symbol or unmet dependency
    assert got["KVM_INTEL"].requested == "n" and got["KVM_INTEL"].actual == "y"
    assert got["KPROBES"].source.endswith("f.config:4")
    assert not any(x.required for x in got.values())
    assert "absent" in got["KPROBES"].describe()


def test_verify_required(tmp_path):
    m = K.merge_fragments([frag(tmp_path, "f.config", "CONFIG_KVM_AMD=y\nCONFIG_KVM=y\n")])
    got = {x.symbol: x for x in K.verify(m, FINAL, required={"CONFIG_KVM_AMD", "KVM", "KPROBES", "KVM_INTEL"})}
    assert set(got) == {"KVM_AMD", "KPROBES"}
    assert got["KVM_AMD"].required is True
    # required but set by no fragment: must come out enabled
    assert got["KPROBES"] == K.Mismatch("KPROBES", "y", None, "required", True)


def test_verify_not_set_and_absent_is_fine(tmp_path):
    m = K.merge_fragments([frag(tmp_path, "f.config", "# CONFIG_SLOB is not set\nCONFIG_KVM=y\n")])
    assert K.verify(m, FINAL) == []


# --- hashing and bases ----------------------------------------------------------------

def test_config_hash_ignores_comments_and_order():
    a = "# Linux/x86 6.1.192 Kernel Configuration\n# Tue Jan 1 00:00:00 2030\nCONFIG_A=y\n# CONFIG_B is not set\n"
    b = "# Linux/x86 6.1.192 Kernel Configuration\n# Wed Feb 2 11:11:11 2031\n\n# CONFIG_B is not set\nCONFIG_A=y\n"
    assert K.config_hash(a) == K.config_hash(b)
    assert len(K.config_hash(a)) == 64
    assert K.config_hash(a) != K.config_hash(a.replace("CONFIG_A=y", "CONFIG_A=m"))
    assert K.config_hash(a) != K.config_hash(a.replace("# CONFIG_B is not set", "CONFIG_B=y"))


@pytest.mark.parametrize("base,kind", [
    ("defconfig", "target"), ("tinyconfig", "target"), ("allnoconfig", "target"),
    ("x86_64_defconfig", "target"), ("kvm_guest.config", "target"),
    ("./my.config", "file"), ("configs/host.config", "file"), ("/boot/config-6.1.0-13-amd64", "file"),
    ("config-6.1", "file"),
])
def test_base_kind(base, kind):
    assert K.base_kind(base) == kind


@pytest.mark.parametrize("base", ["menuconfig", "olddefconfig", ""])
def test_base_kind_rejects_non_bases(base):
    with pytest.raises(InputError):
        K.base_kind(base)


def test_base_config_paths(tmp_path):
    b = K.BaseConfig.parse("host.config/../host.config", relative_to=tmp_path)
    assert b.kind == "file" and b.path == tmp_path / "host.config/../host.config"
    with pytest.raises(InputError, match="does not exist"):
        b.read()
    assert K.BaseConfig.parse("tinyconfig") == K.BaseConfig("tinyconfig", "target")
    assert K.in_tree_target_paths("tinyconfig") == []
    assert K.in_tree_target_paths("kvm_guest.config") == ["kernel/configs/kvm_guest.config",
                                                          "arch/x86/configs/kvm_guest.config"]
    assert K.in_tree_target_paths("x86_64_defconfig") == ["arch/x86/configs/x86_64_defconfig"]


# --- the shipped fragments --------------------------------------------------------------

SHIPPED = ["x86_64-base", "kvm", "kvm-modules", "kvm-trace", "lab-qemu", "debug"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_fragments_parse(name):
    f = K.parse_fragment(CONFIGS / f"{name}.config")
    assert f.settings


def test_shipped_kvm_fragments():
    kvm = {s.symbol: s.value for s in K.parse_fragment(CONFIGS / "kvm.config").settings}
    mods = {s.symbol: s.value for s in K.parse_fragment(CONFIGS / "kvm-modules.config").settings}
    assert {kvm[s] for s in ("VIRTUALIZATION", "KVM", "KVM_INTEL", "KVM_AMD")} == {"y"}
    assert [mods[s] for s in ("KVM", "KVM_INTEL", "KVM_AMD")] == ["m", "m", "m"]
    assert mods["MODULES"] == mods["MODULE_UNLOAD"] == "y"


TARBALL_61 = Path("/usr/src/linux-source-6.1.tar.xz")


@pytest.mark.slow
@pytest.mark.skipif(not TARBALL_61.exists() or not all(shutil.which(t) for t in ("make", "gcc", "flex", "bison")),
                    reason="needs Debian linux-source-6.1 and a host toolchain")
def test_shipped_fragments_take_on_6_1_tinyconfig(tmp_path):
    """tinyconfig + the shipped fragments + olddefconfig on a real 6.1 tree: every value
    takes; and without kvm.config's HIGH_RES_TIMERS, verify() sees KVM dropped."""
    subprocess.run(["tar", "-xJf", str(TARBALL_61), "--wildcards", "*Kconfig*", "*/Makefile", "*/scripts/*",
                    "*/arch/x86/Makefile*", "*/arch/x86/configs/*", "*/kernel/configs/*"],
                   cwd=tmp_path, check=True)
    tree = tmp_path / "linux-source-6.1"

    def configure(name: str, fragments: list[K.Fragment]) -> tuple[K.MergeResult, str]:
        out = tmp_path / name
        subprocess.run(["make", "-s", f"O={out}", "tinyconfig"], cwd=tree, check=True, capture_output=True)
        merge = K.merge_fragments(fragments)
        cfg = out / ".config"
        cfg.write_text(K.merged_text(cfg.read_text(), merge))
        subprocess.run(["make", "-s", f"O={out}", "olddefconfig"], cwd=tree, check=True, capture_output=True)
        return merge, cfg.read_text()

    shipped = [K.parse_fragment(CONFIGS / f"{n}.config") for n in ("x86_64-base", "kvm", "kvm-trace", "lab-qemu")]
    merge, final = configure("all", shipped)
    assert K.verify(merge, final, required={"KVM", "KVM_AMD", "KPROBES"}) == []
    assert K.parse_config(final)["KVM_AMD"] == "y"

    bare = frag(tmp_path, "bare-kvm.config", "CONFIG_VIRTUALIZATION=y\nCONFIG_KVM=y\nCONFIG_KVM_AMD=y\n")
    merge, final = configure("bare", [K.parse_fragment(CONFIGS / "x86_64-base.config"), bare])
    missing = {m.symbol: m for m in K.verify(merge, final, required={"KVM"})}
    assert set(missing) == {"KVM", "KVM_AMD"}
    assert missing["KVM"].actual is None and missing["KVM"].required
