"""kvm-unit-tests as a workload (being split into parse, source and run)."""

from kpatchtest.workloads.kut.run import (
    FETCH_TIMEOUT_S,
    GROUP,
    KILL_GRACE_S,
    LOG_MAX_BYTES,
    SOURCE_MARKER,
    SSH_SLACK_S,
    KutError,
    LogSummary,
    TestOutcome,
    build_kut,
    deploy_kut,
    kut_source,
    parse_log,
    parse_plain,
    parse_summary,
    parse_tap,
    parse_vmexit,
    resolve,
    run_kut,
    tap_plan,
    vmexit_metrics,
)

__all__ = [
    "FETCH_TIMEOUT_S", "GROUP", "KILL_GRACE_S", "LOG_MAX_BYTES", "SOURCE_MARKER", "SSH_SLACK_S",
    "KutError", "LogSummary", "TestOutcome",
    "build_kut", "deploy_kut", "kut_source", "run_kut",
    "parse_log", "parse_plain", "parse_summary", "parse_tap", "parse_vmexit", "resolve", "tap_plan",
    "vmexit_metrics",
]
