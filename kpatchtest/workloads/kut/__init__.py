"""kvm-unit-tests as a workload: `source` turns a directory or git URL+ref into a built tree,
`run` deploys it to a lab host and runs run_tests.sh, `parse` reads what that prints (and
why: see its docstring) and decides each test's verdict."""

from kpatchtest.workloads.kut.parse import (
    LogSummary,
    TestOutcome,
    parse_log,
    parse_plain,
    parse_summary,
    parse_tap,
    parse_vmexit,
    resolve,
    tap_plan,
    vmexit_metrics,
)
from kpatchtest.workloads.kut.run import (
    GROUP,
    KILL_GRACE_S,
    LOG_MAX_BYTES,
    SSH_SLACK_S,
    deploy_kut,
    run_kut,
)
from kpatchtest.workloads.kut.source import (
    FETCH_TIMEOUT_S,
    SOURCE_MARKER,
    KutError,
    build_kut,
    kut_source,
)

__all__ = [
    "FETCH_TIMEOUT_S", "GROUP", "KILL_GRACE_S", "LOG_MAX_BYTES", "SOURCE_MARKER", "SSH_SLACK_S",
    "KutError", "LogSummary", "TestOutcome",
    "build_kut", "deploy_kut", "kut_source", "run_kut",
    "parse_log", "parse_plain", "parse_summary", "parse_tap", "parse_vmexit", "resolve", "tap_plan",
    "vmexit_metrics",
]
