"""The host toolchain a build used: part of every build's identity."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from kpatchtest.util import sha256_text


def first_line(cmd: list[str]) -> str | None:
    """The first line `cmd` prints (a compiler's `--version`), or None when it cannot run,
    fails or prints nothing: the one probe of a tool's identity for every cache key."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (p.stdout or p.stderr).splitlines()[0].strip() if p.returncode == 0 and (p.stdout or p.stderr) else None


@dataclass(frozen=True)
class Toolchain:
    cc: str                 # "gcc"
    cc_version: str         # first line of `gcc --version`
    make_version: str
    ccache: str | None      # path of ccache, if installed

    @classmethod
    def detect(cls, cc: str = "gcc") -> "Toolchain":
        from kpatchtest.errors import InputError
        version = first_line([cc, "--version"])
        make = first_line(["make", "--version"])
        if not version or not make:
            raise InputError(f"no working {cc if not version else 'make'} on this machine",
                             hint="apt-get install build-essential flex bison bc libelf-dev libssl-dev")
        return cls(cc=cc, cc_version=version, make_version=make, ccache=shutil.which("ccache"))

    def key(self) -> str:
        return sha256_text(f"{self.cc_version}\0{self.make_version}")[:16]

    @property
    def cc_command(self) -> str:
        """CC for make: through ccache when it is there (same for config and build)."""
        return f"ccache {self.cc}" if self.ccache else self.cc
