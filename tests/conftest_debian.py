"""Debian's kernel source trees, imported as branches of one bare cache repo.

Fixtures (load with ``pytest_plugins = ["tests.conftest_debian"]`` in tests/conftest.py):

- ``debian_trees`` (session): ``(Git, {"6.1": ImportedTree, "6.12": ImportedTree})``,
  the tarballs of the Debian packages linux-source-6.1 and linux-source-6.12
  (/usr/src/linux-source-*.tar.xz) imported by ``kpatchtest.tarball.import_tarball``
  into one bare repo (refs ``refs/kpatchtest/imports/<version>``). Skips when a
  tarball is not installed.

A cold import of both trees takes about 45 s on 2 cores; set
``KPATCHTEST_TEST_DEBIAN_CACHE=/some/dir`` to keep the repo between sessions (a
cached import then takes a few milliseconds).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kpatchtest.gitutil import Git
from kpatchtest.tarball import ImportedTree, import_tarball

__all__ = ["DEBIAN_TARBALLS", "debian_trees"]

DEBIAN_TARBALLS: dict[str, Path] = {
    "6.1": Path("/usr/src/linux-source-6.1.tar.xz"),
    "6.12": Path("/usr/src/linux-source-6.12.tar.xz"),
}


@pytest.fixture(scope="session")
def debian_trees(tmp_path_factory) -> tuple[Git, dict[str, ImportedTree]]:
    missing = [str(p) for p in DEBIAN_TARBALLS.values() if not p.is_file()]
    if missing:
        pytest.skip(f"Debian kernel source tarball(s) not installed: {', '.join(missing)} "
                    f"(apt-get install linux-source-6.1 linux-source-6.12)")
    keep = os.environ.get("KPATCHTEST_TEST_DEBIAN_CACHE")
    if keep:
        repo = Path(keep) / "debian-trees.git"
        repo.parent.mkdir(parents=True, exist_ok=True)
    else:
        repo = tmp_path_factory.mktemp("debian-cache") / "cache.git"
    if not (repo / "HEAD").exists():
        subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    git = Git(repo)
    trees = {key: import_tarball(git, path) for key, path in DEBIAN_TARBALLS.items()}
    return git, trees
