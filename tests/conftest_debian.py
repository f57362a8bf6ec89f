"""Debian's kernel source trees, imported as branches of one bare cache repo.

Fixtures (load with ``pytest_plugins = ["tests.conftest_debian"]`` in tests/conftest.py):

- ``kpt_cache`` (session): a kpatchtest cache directory (``--cache-dir``) shared by the
  session's expensive fixtures: imported trees, kernel builds, ccache.
- ``debian_trees`` (session): ``(Git, {"6.1": ImportedTree, "6.12": ImportedTree})``,
  the tarballs of the Debian packages linux-source-6.1 and linux-source-6.12
  (/usr/src/linux-source-*.tar.xz) imported by ``kpatchtest.tarball.import_tarball``
  into the cache's tarball repository, the one ``kpatchtest run`` uses for specs
  whose branches are tarballs: a run with ``--cache-dir kpt_cache`` finds them
  imported. Skips when a tarball is not installed.

A cold import of both trees takes about 45 s on 2 cores; set
``KPATCHTEST_TEST_CACHE=/some/dir`` to keep the cache between sessions (a cached
import then takes a few milliseconds, a repeated build no make at all).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kpatchtest.gitutil import Git
from kpatchtest.kernelrepo import KernelCache
from kpatchtest.tarball import ImportedTree, import_tarball

__all__ = ["DEBIAN_TARBALLS", "debian_trees", "kpt_cache"]

DEBIAN_TARBALLS: dict[str, Path] = {
    "6.1": Path("/usr/src/linux-source-6.1.tar.xz"),
    "6.12": Path("/usr/src/linux-source-6.12.tar.xz"),
}


@pytest.fixture(scope="session")
def kpt_cache(tmp_path_factory) -> Path:
    keep = os.environ.get("KPATCHTEST_TEST_CACHE")
    path = Path(keep) if keep else tmp_path_factory.mktemp("kpt-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def debian_trees(kpt_cache) -> tuple[Git, dict[str, ImportedTree]]:
    missing = [str(p) for p in DEBIAN_TARBALLS.values() if not p.is_file()]
    if missing:
        pytest.skip(f"Debian kernel source tarball(s) not installed: {', '.join(missing)} "
                    f"(apt-get install linux-source-6.1 linux-source-6.12)")
    git = KernelCache(kpt_cache, None).open()
    trees = {key: import_tarball(git, path) for key, path in DEBIAN_TARBALLS.items()}
    return git, trees
