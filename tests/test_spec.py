"""Spec validation: every user error is one line with file:line, key path, expected and found."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kpatchtest.errors import InputError
from kpatchtest.fetch.sources import MboxSource, MsgidSource
from kpatchtest.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
name: x
series:
  - msgid: abc@example.org
    version: 3
  - mbox: patches/fix.mbox
kernel:
  repo: ../linux
  upstream: master
  branches:
    - linux-6.1.y
    - {name: debian-6.1, tarball: /usr/src/linux-source-6.1.tar.xz}
gates:
  apply: {default: clean, linux-6.1.y: partial}
"""


def test_good_spec_resolves_paths_relative_to_the_spec(tmp_path):
    spec = parse_spec(GOOD, tmp_path / "s.yaml").spec
    assert spec.sources == [MsgidSource(msgid="abc@example.org", version=3),
                            MboxSource(mbox=str(tmp_path / "patches/fix.mbox"))]
    assert spec.kernel.repo == str((tmp_path / "../linux").resolve())
    assert [b.name for b in spec.kernel.branches] == ["linux-6.1.y", "debian-6.1"]
    assert spec.gates.apply_level("linux-6.1.y") == "partial"
    assert spec.gates.apply_level("debian-6.1") == "clean"


@pytest.mark.parametrize("text, expected", [
    (GOOD.replace("  branches:", "  branchs:"), "s.yaml:9: kernel.branchs: unknown key (allowed: branches, repo, upstream)"),
    (GOOD.replace("    version: 3", "    verison: 3"), "s.yaml:4: series[0].verison: unknown key"),
    (GOOD.replace("    version: 3", "    version: three"), "s.yaml:4: series[0].version: input should be a valid integer"),
    (GOOD.replace("  - msgid: abc@example.org\n    version: 3\n", "  - foo: 1\n"),
     "s.yaml:3: series[0]: expected a mapping with one of msgid:, mbox:, commits:; found {'foo': 1}"),
    (GOOD.replace("default: clean", "default: cleen"), "s.yaml:13: gates.apply.default: input should be 'clean', 'three-way', 'partial' or 'any'; found 'cleen'"),
    (GOOD + "workload: []\n", "s.yaml:14: workload: unknown key (allowed: apply, build, compare, configs, fetch, gates"),
    (GOOD.replace("name: x\n", ""), "s.yaml: name: required key is missing"),
    ("name: x\nseries: [\n", "s.yaml:3: malformed YAML"),
    ("._\n", "s.yaml: malformed YAML: a value looks like a number or a date but is not one"),
    (GOOD + "when: 2026-13-45\n", "s.yaml: malformed YAML: a value looks like a number or a date but is not one "
                                  "(month must be in 1..12)"),
    (GOOD + "mask: 0x_\n", "s.yaml: malformed YAML: a value looks like a number"),
    ("- just a list\n", "s.yaml:1: expected a mapping at the top level; found CommentedSeq"),
    (GOOD.replace("  repo: ../linux\n", ""), "s.yaml:6: kernel: kernel.repo is required unless every branch names a tarball"),
    (GOOD + "workloads: {}\n", "s.yaml:14: workloads: name at least one workload: kvm_unit_tests or smm_boot"),
    (GOOD + "workloads:\n  smm_boot: {reeds: 5}\n", "s.yaml:15: workloads.smm_boot.reeds: unknown key"),
    (GOOD + "workloads:\n  smm_boot: {reads: 0}\n", "workloads.smm_boot.reads: input should be greater than or equal to 1"),
    (GOOD + "workloads:\n  kvm_unit_tests: {env: {'A B': x}}\n", "workloads.kvm_unit_tests.env"),
    (GOOD + "workloads:\n  kvm_unit_tests: {tests: ['access; rm -rf /']}\n", "workloads.kvm_unit_tests.tests[0]"),
])
def test_bad_specs_give_one_located_line(tmp_path, text, expected):
    with pytest.raises(InputError) as e:
        parse_spec(text, tmp_path / "s.yaml")
    msg = str(e.value)
    assert expected in msg, msg
    assert "\n" not in msg and "Traceback" not in msg


def test_an_unknown_home_directory_is_kept_as_written(tmp_path):
    """`~nosuchuser` is no crash (Path.expanduser raises RuntimeError): the path stays as
    written, relative to the spec, and is then reported as missing like any other."""
    text = GOOD + "workloads:\n  kvm_unit_tests: {source: ~kpt-no-such-user/kut}\n"
    kut = parse_spec(text, tmp_path / "s.yaml").spec.workloads.kvm_unit_tests
    assert kut.source == str(tmp_path / "~kpt-no-such-user" / "kut")
    home = parse_spec(text.replace("~kpt-no-such-user", "~"), tmp_path / "s.yaml").spec.workloads.kvm_unit_tests
    assert home.source == str(Path.home() / "kut")


def test_workloads_section(tmp_path):
    text = GOOD.replace("  apply: {default: clean, linux-6.1.y: partial}\n", "  workloads: no-new-failures\n") + ("workloads:\n  rounds: 2\n  repetitions: 5\n"
                   "  kvm_unit_tests: {source: ../kvm-unit-tests, tests: [access, vmexit_cr0_wp], env: {ACCEL: kvm}}\n"
                   "  smm_boot: {reads: 400, spread_mb: 16}\n"
                   )
    w = parse_spec(text, tmp_path / "s.yaml").spec
    assert w.gates.workloads == "no-new-failures"
    wl = w.workloads
    assert (wl.rounds, wl.repetitions, wl.smm_boot.reads, wl.smm_boot.spread_mb, wl.smm_boot.disk) == (2, 5, 400, 16, "ahci")
    assert wl.kvm_unit_tests.source == str((tmp_path / "../kvm-unit-tests").resolve())   # relative to the spec
    assert wl.kvm_unit_tests.tests == ["access", "vmexit_cr0_wp"]
    url = parse_spec(GOOD + "workloads: {kvm_unit_tests: {}}\n", tmp_path / "s.yaml").spec.workloads.kvm_unit_tests
    assert url.source.startswith("https://") and url.ref is None          # the upstream repository by default


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["tdp-roots.yaml", "cr0-wp.yaml", "demo.yaml"])
def test_shipped_specs_validate(name):
    spec = load_spec(ROOT / "series" / name).spec
    assert spec.kernel.branches


def test_shipped_real_series_name_the_seed_message_ids():
    tdp = load_spec(ROOT / "series/tdp-roots.yaml").spec
    assert tdp.sources == [MsgidSource(msgid="20230426220323.3079789-1-seanjc@google.com", version=3)]
    assert [b.name for b in tdp.kernel.branches] == ["linux-5.10.y", "linux-5.15.y", "linux-6.1.y"]
    cr0 = load_spec(ROOT / "series/cr0-wp.yaml").spec
    assert [s.msgid for s in cr0.sources] == ["20230322013731.102955-1-minipli@grsecurity.net",
                                              "20230405002608.418442-1-seanjc@google.com"]


def test_compare_and_gates_sections(tmp_path):
    text = GOOD + ("  regressions: allow-flaky\n  metrics:\n    wall_time: {max_slowdown: 5%}\n"
                   "    root_allocs: {max_increase: 0%}\n    kvm.pf_fixed: {max_increase: 0.1}\n"
                   "compare: {threshold: 3.5%, reruns: 1, bootstrap: 5000, seed: 7}\n"
                   "workloads: {smm_boot: {}, order: random, seed: 3}\n")
    s = parse_spec(text, tmp_path / "s.yaml").spec
    assert (s.compare.threshold, s.compare.reruns, s.compare.bootstrap, s.compare.seed) == (0.035, 1, 5000, 7)
    assert (s.workloads.order, s.workloads.seed) == ("random", 3)
    g = s.gates.metrics
    assert s.gates.regressions == "allow-flaky"
    assert [(n, m.key, m.limit) for n, m in g.items()] == [
        ("wall_time", "max_slowdown", 0.05), ("root_allocs", "max_increase", 0.0), ("kvm.pf_fixed", "max_increase", 0.1)]
    d = parse_spec(GOOD, tmp_path / "s.yaml").spec
    assert (d.compare.threshold, d.compare.reruns, d.compare.bootstrap, d.compare.seed) == (0.02, 2, 10000, 1)


METRIC_GATES = GOOD + "  metrics:\n    %s\n"


@pytest.mark.parametrize("text, expected", [
    (METRIC_GATES % "wal_time: {max_slowdown: 5%}", "s.yaml:15: gates.metrics.wal_time: unknown metric 'wal_time' (known: cycles"),
    (METRIC_GATES % "wall_time: {max_slowdonw: 5%}", "s.yaml:15: gates.metrics.wall_time: unknown key 'max_slowdonw' (allowed: max_slowdown, max_increase)"),
    (METRIC_GATES % "wall_time: {max_increase: 5%}", "gates.metrics: metric 'wall_time' is a time (s): use max_slowdown"),
    (METRIC_GATES % "root_allocs: {max_slowdown: 5%}", "gates.metrics: metric 'root_allocs' is a count (roots), not a time: use max_increase"),
    (METRIC_GATES % "smm_transitions: {max_increase: 5%}", "metric 'smm_transitions' only describes the workload"),
    (METRIC_GATES % "wall_time: {max_slowdown: 5}", "gates.metrics.wall_time.max_slowdown: a bare number is a fraction (0.02 = 2%): write '5%'"),
    (METRIC_GATES % "wall_time: {max_slowdown: fast}", "gates.metrics.wall_time.max_slowdown: expected a percentage like '2%'"),
    (METRIC_GATES % "wall_time: {max_slowdown: -1%}", "gates.metrics.wall_time.max_slowdown: input should be greater than or equal to 0"),
    (METRIC_GATES % "wall_time: {}", "gates.metrics.wall_time: give one of max_slowdown, max_increase"),
    (METRIC_GATES % "wall_time: 5%", "gates.metrics.wall_time: expected a mapping like {max_slowdown: 5%}"),
    (GOOD + "  regressions: some\n", "s.yaml:14: gates.regressions: input should be 'none' or 'allow-flaky'"),
    (GOOD + "compare: {treshold: 2%}\n", "s.yaml:14: compare.treshold: unknown key (allowed: bootstrap, reruns, seed, threshold)"),
    (GOOD + "compare: {threshold: 2}\n", "compare.threshold: a bare number is a fraction"),
    (GOOD + "compare: {threshold: true}\n", "compare.threshold: expected a percentage"),
    (GOOD + "compare: {bootstrap: 10}\n", "compare.bootstrap: input should be greater than or equal to 1000"),
    (GOOD + "workloads: {smm_boot: {}, order: shuffled}\n", "workloads.order: input should be 'alternate' or 'random'"),
])
def test_bad_compare_and_gates_give_one_line_naming_the_key(tmp_path, text, expected):
    with pytest.raises(InputError) as e:
        parse_spec(text, tmp_path / "s.yaml")
    msg = str(e.value)
    assert expected in msg, msg
    assert "\n" not in msg


def test_the_readme_spec_example_is_a_spec(tmp_path):
    """The README documents every section with one example: it must stay a valid spec."""
    block = re.search(r"## The series spec\n\n```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    spec = parse_spec(block.group(1), tmp_path / "s.yaml").spec
    assert spec.compare.threshold == 0.02 and spec.gates.regressions == "none"
    assert set(spec.gates.metrics) == {"wall_time", "root_allocs"} and spec.workloads.order == "random"
