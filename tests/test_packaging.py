"""An installed kpatchtest must carry what a checkout has: the configs and lab inventories
are package data (kpatchtest/data), found next to the code, not beside a source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_every_package_file(tmp_path):
    # built from a copy: setuptools leaves build/ and *.egg-info behind in the tree it builds
    src = tmp_path / "src"
    shutil.copytree(ROOT / "kpatchtest", src / "kpatchtest", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = tmp_path.glob("kpatchtest-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "kpatchtest"], capture_output=True, text=True,
                             check=True).stdout.split()
    missing = [f for f in tracked if f not in names]
    assert not missing, missing
    assert "kpatchtest/data/configs/kvm.config" in names and "kpatchtest/data/configs/labs/example-hw.yaml" in names


def test_spec_fragments_resolve_inside_the_package():
    from kpatchtest.lab.ssh.inventory import LABS_DIR
    from kpatchtest.spec import CONFIGS_DIR
    import kpatchtest
    pkg = Path(kpatchtest.__file__).resolve().parent
    assert CONFIGS_DIR.is_relative_to(pkg) and LABS_DIR.is_relative_to(pkg)
    assert (CONFIGS_DIR / "x86_64-base.config").is_file() and (LABS_DIR / "example-hw.yaml").is_file()
