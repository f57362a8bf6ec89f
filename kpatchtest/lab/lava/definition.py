"""A BootJob as a LAVA job definition (a dict, written with yaml.safe_dump).

Own templates, not tuxlava: tuxlava's qemu jobs fetch its own root filesystems and test
definitions from the internet and assume a rootfs with a full userland; here the device
boots the build's bzImage with the lab image (kpatchtest.lab.local.image) as its ramdisk,
and everything the test needs travels inside that ramdisk:

- deploy to tmpfs: `kernel` (with the command line in its image_arg) and `initrd`
  (format cpio.newc, gzip), with overlays: LAVA's own test overlay (`lava: true`), the
  build's modules tarball, and a tarball of /kpatchtest (the workload script and the
  files it uses), all appended to the ramdisk by the dispatcher (AppendOverlays) so the
  device needs no network;
- boot method qemu, media tmpfs, the lab image's shell prompt;
- a test action with one inline definition: check the kernel release (lava-test-case),
  then run the workload script, which reports each repetition with
  `lava-test-case NAME --result pass|fail --measurement V --units s`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import yaml

DEVICE_FILES = "/kpatchtest"            # where the overlays put kpatchtest's files in the ramdisk
WORKLOAD_SCRIPT = f"{DEVICE_FILES}/workload.sh"
TEST_NAME = "kpatchtest"                # the inline definition; LAVA names its suite 0_kpatchtest

# After each nested boot: its result as a LAVA test case (RC 33: the guest wrote success).
REPORT_SHELL = r"""kpt_report() {   # NAME RC GUEST_S WALL_S
    if [ "$2" = 33 ]; then r=pass; else r=fail; fi
    if [ -n "$3" ]; then
        lava-test-case "$1" --result "$r" --measurement "$3" --units s
        lava-test-case "$1.wall_time" --result "$r" --measurement "$4" --units s
    else
        lava-test-case "$1" --result fail
    fi
}"""


@dataclass
class JobFiles:
    """What the job deploys: names of files under the job's artifact URL."""

    kernel: str
    ramdisk: str
    modules: str | None = None
    bundle: str | None = None   # a tarball of DEVICE_FILES (the workload script, its files)


def definition(*, name: str, device_type: str, base_url: str, files: JobFiles, cmdline: str,
               expected_release: str, prompt: str, timeout_minutes: int, boot_minutes: int = 10,
               test_minutes: int | None = None) -> dict[str, Any]:
    """The job definition as data. `base_url`: where the dispatcher downloads `files`."""
    url = lambda f: posixpath.join(base_url.rstrip("/") + "/", f)  # noqa: E731
    overlays: dict[str, Any] = {"lava": True}
    if files.modules:
        overlays["modules"] = {"url": url(files.modules), "format": "tar", "path": "/"}
    if files.bundle:
        # a tar, not `format: file` overlays: those are copied into existing directories only
        overlays["kpatchtest"] = {"url": url(files.bundle), "format": "tar", "path": "/"}
    steps = [f'lava-test-case kernelrelease --shell test "$(uname -r)" = {_sh_word(expected_release)}']
    if files.bundle:
        steps.append(f"sh {WORKLOAD_SCRIPT}")
    test_minutes = test_minutes or max(1, timeout_minutes - boot_minutes - 5)
    return {
        "job_name": name,
        "device_type": device_type,
        "priority": "medium",
        "visibility": "public",
        "context": {"arch": "amd64"},
        "timeouts": {"job": {"minutes": timeout_minutes}, "action": {"minutes": boot_minutes},
                     "connection": {"minutes": 2}},
        "actions": [
            {"deploy": {
                "to": "tmpfs",
                "timeout": {"minutes": 5},
                "images": {
                    "kernel": {"url": url(files.kernel), "image_arg": f"-kernel {{kernel}} -append {_sh_word(cmdline)}"},
                    "initrd": {"url": url(files.ramdisk), "image_arg": "-initrd {initrd}",
                               "format": "cpio.newc", "compression": "gz", "overlays": overlays},
                }}},
            {"boot": {
                "method": "qemu",
                "media": "tmpfs",
                "timeout": {"minutes": boot_minutes},
                "prompts": [prompt],
            }},
            {"test": {
                "timeout": {"minutes": test_minutes},
                "definitions": [{
                    "from": "inline",
                    "name": TEST_NAME,
                    "path": f"inline/{TEST_NAME}.yaml",
                    "repository": {
                        "metadata": {"format": "Lava-Test Test Definition 1.0", "name": TEST_NAME,
                                     "description": "kpatchtest: the booted kernel and the spec's workloads"},
                        "run": {"steps": steps},
                    },
                }],
            }},
        ],
    }


def dump(defn: dict[str, Any]) -> str:
    return yaml.safe_dump(defn, sort_keys=False, default_flow_style=False, width=1000)


def _sh_word(s: str) -> str:
    """A double-quoted shell word: LAVA joins QEMU's command line into one shell string,
    and the test step is shell text."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`") + '"'
