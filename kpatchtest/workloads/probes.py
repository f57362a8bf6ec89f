"""Probe points for the SMM-heavy boot, chosen by what exists on the running kernel.

The names differ by kernel version (checked against the Debian trees 5.10.223,
6.1.192 and 6.12.117):

| metric | 5.10 | 6.1 | 6.12 |
|---|---|---|---|
| smm_transitions | tracepoint kvm:kvm_enter_smm | kvm:kvm_smm_transition | kvm:kvm_smm_transition |
| root_lookups | kvm_tdp_mmu_get_vcpu_root_hpa | kvm_tdp_mmu_get_vcpu_root_hpa | kvm_tdp_mmu_alloc_root |
| root_allocs | alloc_tdp_mmu_page (static) called from kvm_tdp_mmu_get_vcpu_root_hpa | tdp_mmu_init_sp (static) with sptep == NULL if not inlined, else kretprobe kvm_tdp_mmu_get_vcpu_root_hpa counting distinct roots | tdp_mmu_init_sp if not inlined, else none |
| roots_freed | kvm_tdp_mmu_free_root | _raw_spin_lock called from kvm_tdp_mmu_put_root (the final put; call_rcu itself is a tail call) | same |
| root_puts | - (kvm_mmu_put_root is static inline) | kvm_tdp_mmu_put_root | kvm_tdp_mmu_put_root |
| tdp_pages_allocated | alloc_tdp_mmu_page (static) | tdp_mmu_alloc_sp (static, inlined in practice), else tracepoint kvmmmu:kvm_mmu_get_page (tdp_mmu_init_sp traces every TDP MMU page) | same |
| tdp_pages_freed | free_pages called from __handle_changed_spte or kvm_tdp_mmu_free_root | tdp_mmu_free_sp_rcu_callback (static, address taken: never inlined), else tdp_mmu_free_sp (static) | same |

5.10 rows measured on a 5.10.223 tiny KVM build (kvm.tdp_mmu=1, 200 reads): 5.10's
kvm_tdp_mmu_map allocates a child table with the *parent's* level
(`alloc_tdp_mmu_page(vcpu, iter.gfn, iter.level)`), so the first child of every root is
labelled level 4 as well, and a `level >= 4` filter counted each root twice (1662 for 827
roots). Roots are therefore counted by call site: the calls of alloc_tdp_mmu_page made
from kvm_tdp_mmu_get_vcpu_root_hpa (get_tdp_mmu_vcpu_root is inlined there).

Static functions may be inlined, or emitted as a `.constprop.N` / `.isra.N` / `.part.N`
clone: a probe is *tried* on the running kernel, never assumed. kvm_tdp_mmu_get_root is
`static inline` in tdp_mmu.h (6.1, 6.12): not probeable.

Counting works on a minimal tracing kernel (KPROBES + KPROBE_EVENTS + EVENT_TRACING; no
HIST_TRIGGERS, FUNCTION_TRACER optional):
- a plain kprobe is counted from `kprobe_profile` (hits; not limited by the buffer);
- tracepoints and filtered kprobes by counting their lines in `trace` (one awk pass);
  if any CPU's ring buffer overran, those counts are unknown (None), never a low number;
- `distinct`: the number of different values of one field (distinct root addresses);
- `hot`: a probe on a function the whole kernel calls all the time (_raw_spin_lock): it
  slows every probed run and, on one CPU, makes the other kprobes miss hits that arrive
  (softirqs, RCU callbacks) while its handler runs. Tried only with
  `setup_script(hot=True)` (`run_probed(..., hot=True)`); the pipeline leaves it off;
- `callers`: a kprobe at a function's entry that counts only the calls made from the
  listed functions: the probe fetches its return address (`$stack0`) and its filter keeps
  the address ranges of those functions, taken from /proc/kallsyms on the host (start to
  the next text symbol; .constprop/.isra/.part/.cold clones included). Listed functions
  missing from kallsyms are ignored; if none is there the probe does not take. A caller
  that reaches the function by a tail call (jmp) is invisible: its calls do not count.

Flow on the lab host, as root: `setup_script()` before the boot (registers, enables,
clears the buffer), the boot, `collect_script()` (stops tracing, prints counts, removes
the probes). `read_probes(setup_out, collect_out)` turns the two outputs into readings;
a probe that did not register reads None (unavailable), never 0.

KVM's own counters (debugfs /sys/kernel/debug/kvm/PID-FD/*) exist only while the VM
lives; smm.RUN_SCRIPT samples them during the boot. Binary stats (KVM_GET_STATS_FD)
need the VM's fd and are not reachable from a shell.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal

Kind = Literal["tracepoint", "kprobe", "kretprobe"]
CountBy = Literal["trace", "profile", "distinct"]
ProbeStatus = Literal["registered", "missing", "skipped"]

GROUP = "kpt"                     # kprobe event group: events/kpt/<metric>
DEFAULT_BUFFER_KB = 16384         # per CPU while measuring
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Candidate:
    kind: Kind
    target: str                   # "kvm:kvm_smm_transition", or a kernel function
    versions: str = ""            # where it exists, for the report
    static: bool = False          # a static function: may be inlined or cloned
    fetch: str = ""               # kprobe fetch arguments, e.g. "level=%dx:s32"
    filter: str = ""              # event filter, e.g. "level >= 4"
    count: CountBy = "profile"
    field: str = ""               # for count == "distinct"
    note: str = ""
    callers: tuple[str, ...] = () # kprobe: count only calls from these functions (see above)
    hot: bool = False             # on a hot kernel function: tried only with setup_script(hot=True)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}" + (f" from {'|'.join(self.callers)}" if self.callers else "")

    def event(self, metric: str) -> str:
        """The event name as it appears in `trace` and `kprobe_profile`."""
        return self.target.split(":", 1)[1] if self.kind == "tracepoint" else metric


@dataclass(frozen=True)
class MetricProbes:
    metric: str
    unit: str
    description: str
    candidates: tuple[Candidate, ...]


def _kp(target: str, versions: str, **kw) -> Candidate:
    return Candidate("kprobe", target, versions, **kw)


PROBES: tuple[MetricProbes, ...] = (
    MetricProbes("smm_transitions", "events", "SMM entries plus exits of the L2 guest", (
        Candidate("tracepoint", "kvm:kvm_smm_transition", "6.1 6.12", count="trace",
                  note="renamed from kvm_enter_smm in 2021"),
        Candidate("tracepoint", "kvm:kvm_enter_smm", "5.10", count="trace"),
    )),
    MetricProbes("root_lookups", "calls", "vCPU TDP MMU root loads (find or create a root)", (
        _kp("kvm_tdp_mmu_get_vcpu_root_hpa", "5.10 6.1"),
        _kp("kvm_tdp_mmu_alloc_root", "6.12", note="6.12: replaces kvm_tdp_mmu_get_vcpu_root_hpa"),
        _kp("mmu_alloc_direct_roots", "5.10 6.1 6.12", static=True,
            note="fallback: also counts non-TDP-MMU direct roots"),
    )),
    MetricProbes("root_allocs", "roots", "TDP MMU roots created", (
        _kp("alloc_tdp_mmu_page", "5.10", static=True, count="trace",
            callers=("kvm_tdp_mmu_get_vcpu_root_hpa", "get_tdp_mmu_vcpu_root"),
            note="the page allocations made by the root lookup; not a level filter: 5.10 "
                 "labels a root's first child table with the root's level too"),
        _kp("tdp_mmu_init_sp", "6.1 6.12", static=True, fetch="sptep=%si:u64",
            filter="sptep == 0", count="trace", note="a root has no parent SPTE; often inlined"),
        Candidate("kretprobe", "kvm_tdp_mmu_get_vcpu_root_hpa", "5.10 6.1", fetch="hpa=$retval:x64",
                  count="distinct", field="hpa",
                  note="distinct root addresses; exact when roots persist (6.1), "
                       "a lower bound when freed roots' pages are reused (5.10)"),
    )),
    MetricProbes("roots_freed", "roots", "TDP MMU roots torn down", (
        _kp("kvm_tdp_mmu_free_root", "5.10"),
        _kp("_raw_spin_lock", "6.1 6.12", count="trace", callers=("kvm_tdp_mmu_put_root",), hot=True,
            note="6.x: the final put of a root (only that path of kvm_tdp_mmu_put_root) takes "
                 "tdp_mmu_pages_lock before call_rcu frees it; a hot function: probed runs are "
                 "slower, and this and other kprobes can miss hits (noted) while it runs"),
    )),
    MetricProbes("root_puts", "calls", "TDP MMU root references dropped", (
        _kp("kvm_tdp_mmu_put_root", "6.1 6.12"),
    )),
    MetricProbes("tdp_pages_allocated", "pages", "TDP MMU page-table pages allocated", (
        _kp("alloc_tdp_mmu_page", "5.10", static=True),
        _kp("tdp_mmu_alloc_sp", "6.1 6.12", static=True, note="inlined on 6.1.192 tiny builds"),
        Candidate("tracepoint", "kvmmmu:kvm_mmu_get_page", "6.1 6.12", count="trace",
                  note="traced by tdp_mmu_init_sp for every TDP MMU page, roots included (6.x; "
                       "5.10 traces only non-root pages); also counts shadow-MMU pages, which a "
                       "host running its guests on the TDP MMU does not create"),
    )),
    MetricProbes("tdp_pages_freed", "pages", "TDP MMU page-table pages freed", (
        _kp("tdp_mmu_free_sp_rcu_callback", "6.1 6.12", static=True,
            note="an RCU callback: its address is taken, so it is never fully inlined"),
        _kp("tdp_mmu_free_sp", "6.1 6.12", static=True),
        _kp("free_pages", "5.10", count="trace",
            callers=("__handle_changed_spte", "handle_changed_spte", "kvm_tdp_mmu_free_root"),
            note="5.10 frees each TDP MMU page table with free_page() right there: the "
                 "subtree in __handle_changed_spte, the root page in kvm_tdp_mmu_free_root"),
    )),
    MetricProbes("fast_zaps", "events", "kvm_mmu_zap_all_fast (memslot changes)", (
        Candidate("tracepoint", "kvmmmu:kvm_mmu_zap_all_fast", "5.10 6.1 6.12", count="trace"),
    )),
)


def _validate(probes: tuple[MetricProbes, ...]) -> None:
    for m in probes:
        if not _NAME.match(m.metric):
            raise ValueError(f"bad metric name {m.metric!r}")
        for c in m.candidates:
            names = c.target.split(":") if c.kind == "tracepoint" else [c.target]
            if not all(_NAME.match(n) for n in names):
                raise ValueError(f"bad probe target {c.target!r}")
            if c.count == "distinct" and not _NAME.match(c.field):
                raise ValueError(f"bad distinct field {c.field!r}")
            if c.kind != "tracepoint" and c.count == "profile" and (c.filter or c.callers):
                raise ValueError(f"{c.label}: a filtered kprobe must be counted from trace")
            if c.callers and (c.kind != "kprobe" or not all(_NAME.match(f) for f in c.callers)):
                raise ValueError(f"{c.label}: callers need a kprobe and function names")
            if c.kind == "tracepoint" and c.filter:
                raise ValueError(f"{c.label}: tracepoints take no filter here")


_validate(PROBES)


# --- the shell side ----------------------------------------------------------------

# KPT_TRACEFS (tests): use that directory and nothing else, never the real tracefs.
_FIND_TRACEFS = r"""
T=
if [ -n "${KPT_TRACEFS:-}" ]; then
    [ -f "$KPT_TRACEFS/trace" ] && T=$KPT_TRACEFS
    KPT_MOUNT=0
else
    for t in /sys/kernel/tracing /sys/kernel/debug/tracing; do
        [ -f "$t/trace" ] && { T=$t; break; }
    done
fi
if [ -z "$T" ] && [ "${KPT_MOUNT:-1}" = 1 ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
    [ -f /sys/kernel/tracing/trace ] && T=/sys/kernel/tracing
    if [ -z "$T" ]; then
        mount -t debugfs nodev /sys/kernel/debug 2>/dev/null
        [ -f /sys/kernel/debug/tracing/trace ] && T=/sys/kernel/debug/tracing
    fi
fi
"""

_TEARDOWN = r"""
kpt_teardown() {
    [ -f "$T/tracing_on" ] && echo 0 > "$T/tracing_on"
    [ -f "$T/events/kpt/enable" ] && echo 0 2>/dev/null > "$T/events/kpt/enable"
    for tp in $KPT_TRACEPOINTS; do
        f="$T/events/${tp%%:*}/${tp#*:}/enable"
        [ -f "$f" ] && echo 0 2>/dev/null > "$f"
    done
    if [ -f "$T/kprobe_events" ]; then
        for ev in $(sed -n 's/^[pr][0-9]*:kpt\/\([A-Za-z0-9_]*\) .*/\1/p' "$T/kprobe_events"); do
            echo "-:kpt/$ev" 2>/dev/null >> "$T/kprobe_events"
        done
    fi
}
"""


def _tracepoint_list() -> str:
    tps = sorted({c.target for m in PROBES for c in m.candidates if c.kind == "tracepoint"})
    return " ".join(tps)


def setup_script(buffer_kb: int = DEFAULT_BUFFER_KB, hot: bool = False) -> str:
    """Shell text (POSIX sh, busybox is enough) to run as root before a measured boot.

    Removes earlier kpt probes, sets the per-CPU buffer to `buffer_kb` (the old size is
    kept in $TMPDIR/kpt-trace-buffer-kb for collect_script), then per metric tries its
    candidates in order until one registers and enables. Prints

        kpt-tracefs PATH|none
        kpt-probe METRIC KIND TARGET registered|missing|skipped [SYMBOL]

    one line per candidate ("skipped": an earlier candidate took, or a `hot` candidate
    without `hot`). Exits 0.
    """
    if not 1 <= int(buffer_kb) <= 1 << 20:
        raise ValueError(f"buffer_kb out of range: {buffer_kb}")
    out = ["#!/bin/sh", "# kpatchtest: register the SMM-boot probes (generated by kpatchtest.workloads.probes)",
           f"KPT_TRACEPOINTS={shlex.quote(_tracepoint_list())}", _FIND_TRACEFS, _TEARDOWN, r"""
if [ -z "$T" ]; then
    echo "kpt-tracefs none"
    tracefs=0
else
    echo "kpt-tracefs $T"
    tracefs=1
    kpt_teardown
    sed -n '1s/^\([0-9]*\).*/\1/p' "$T/buffer_size_kb" > "${TMPDIR:-/tmp}/kpt-trace-buffer-kb" 2>/dev/null
    echo "$KPT_BUFFER_KB" 2>/dev/null > "$T/buffer_size_kb"
    echo > "$T/trace"
fi

# kpt_callers FUNC... -> a filter keeping "caller" (a return address) inside those
# functions (and their clones): start address to the next text symbol. Prints nothing if
# none of them is in kallsyms (or its addresses are hidden). Hex addresses of one width
# compare as strings.
kpt_callers() {
    ksyms=${KPT_KALLSYMS:-/proc/kallsyms}
    [ -r "$ksyms" ] || return 0
    awk -v want=" $* " '
    NR == FNR {
        if ($2 !~ /^[tTwW]$/ || $1 ~ /^0+$/) next
        n = $3; sub(/\.cold$/, "", n); sub(/\.(constprop|isra|part)\.[0-9]+$/, "", n)
        if (index(want, " " n " ")) start[$1 ""] = 1
        next
    }
    $2 ~ /^[tTwW]$/ {
        a = $1 ""
        for (s in start) if (a > s && (!(s in end) || a < end[s])) end[s] = a
    }
    END {
        f = ""
        for (s in start) if (s in end) f = f (f == "" ? "" : " || ") "(caller >= 0x" s " && caller < 0x" end[s] ")"
        print f
    }' "$ksyms" "$ksyms"
}

# kpt_try METRIC KIND TARGET DEFINITION FILTER CLONES CALLERS -> 0 when the probe took
kpt_try() {
    metric=$1 kind=$2 target=$3 def=$4 filt=$5 clones=$6 callers=$7
    if [ "$tracefs" != 1 ]; then echo "kpt-probe $metric $kind $target missing"; return 1; fi
    if [ "$kind" = tracepoint ]; then
        d="$T/events/${target%%:*}/${target#*:}"
        if [ -f "$d/enable" ] && echo 1 2>/dev/null > "$d/enable"; then
            echo "kpt-probe $metric $kind $target registered $target"; return 0
        fi
        echo "kpt-probe $metric $kind $target missing"; return 1
    fi
    [ -f "$T/kprobe_events" ] || { echo "kpt-probe $metric $kind $target missing"; return 1; }
    if [ -n "$callers" ]; then
        cf=$(kpt_callers $callers)
        [ -n "$cf" ] || { echo "kpt-probe $metric $kind $target missing"; return 1; }
        if [ -n "$filt" ]; then filt="($cf) && ($filt)"; else filt=$cf; fi
    fi
    syms=$target
    ksyms=${KPT_KALLSYMS:-/proc/kallsyms}
    if [ "$clones" = 1 ] && [ -r "$ksyms" ]; then
        syms="$syms $(awk -v t="$target" '$2 ~ /^[tT]$/ && index($3, t ".") == 1 &&
            substr($3, length(t) + 1) ~ /^\.(constprop|isra|part)\.[0-9]+$/ { print $3 }' "$ksyms" | head -n 3)"
    fi
    for sym in $syms; do
        line=$(printf '%s' "$def" | sed "s/@SYM@/$sym/")
        echo "$line" 2>/dev/null >> "$T/kprobe_events" || continue
        ok=1
        if [ -n "$filt" ]; then
            echo "$filt" 2>/dev/null > "$T/events/kpt/$metric/filter" || ok=0
        fi
        [ "$ok" = 1 ] && { echo 1 2>/dev/null > "$T/events/kpt/$metric/enable" || ok=0; }
        if [ "$ok" = 1 ]; then
            echo "kpt-probe $metric $kind $target registered $sym"; return 0
        fi
        echo "-:kpt/$metric" 2>/dev/null >> "$T/kprobe_events"
    done
    echo "kpt-probe $metric $kind $target missing"; return 1
}
"""]
    out.insert(3, f"KPT_BUFFER_KB={int(buffer_kb)}")
    for m in PROBES:
        out.append("took=0")
        for c in m.candidates:
            skipped = f"echo {shlex.quote(f'kpt-probe {m.metric} {c.kind} {c.target} skipped')}"
            if c.hot and not hot:
                out.append(skipped)
                continue
            if c.kind == "tracepoint":
                definition = ""
            else:
                prefix = "p" if c.kind == "kprobe" else "r"
                fetch = " ".join(f for f in (c.fetch, "caller=$stack0:x64" if c.callers else "") if f)
                definition = f"{prefix}:{GROUP}/{m.metric} @SYM@" + (f" {fetch}" if fetch else "")
            args = " ".join(shlex.quote(a) for a in (
                m.metric, c.kind, c.target, definition, c.filter, "1" if c.static and not c.fetch else "0",
                " ".join(c.callers)))
            out.append(f"if [ $took = 0 ]; then kpt_try {args} && took=1; else {skipped}; fi")
    out.append('[ "$tracefs" = 1 ] && echo 1 > "$T/tracing_on"')
    out.append("exit 0")
    return "\n".join(out) + "\n"


def collect_script(teardown: bool = True) -> str:
    """Shell text to run as root after the boot: stop tracing, print the counts, and
    (teardown) remove the probes and restore the buffer size. Prints

        kpt-tracefs PATH|none
        kpt-profile EVENT HITS MISSES      (kprobe_profile, kpt events only)
        kpt-overrun CPU N                  (per-CPU ring buffer overruns)
        kpt-count EVENT N                  (lines per event in trace)
        kpt-distinct EVENT N               (distinct FIELD= values, for distinct probes)
    """
    distinct = " ".join(f"{m.metric}={c.field}" for m in PROBES for c in m.candidates
                        if c.count == "distinct")
    body = r"""
if [ -z "$T" ]; then echo "kpt-tracefs none"; exit 0; fi
echo "kpt-tracefs $T"
echo 0 > "$T/tracing_on"
if [ -f "$T/kprobe_profile" ]; then
    grep -E '^ *[A-Za-z0-9_]+ +[0-9]+ +[0-9]+ *$' "$T/kprobe_profile" | while read -r ev hits miss; do
        [ -d "$T/events/kpt/$ev" ] && echo "kpt-profile $ev $hits $miss"
    done
fi
for s in "$T"/per_cpu/cpu*/stats; do
    [ -f "$s" ] || continue
    c=${s%/stats}; c=${c##*/cpu}
    sed -n "s/^overrun: *\([0-9]*\).*/kpt-overrun $c \1/p" "$s"
done
awk -v dist="$KPT_DISTINCT" '
BEGIN { n = split(dist, a, " "); for (i = 1; i <= n; i++) { split(a[i], kv, "="); want[kv[1]] = kv[2] } }
/^#/ { next }
{
    for (i = 1; i < NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) break
    if (i >= NF) next
    e = $(i + 1); if (e !~ /:$/) next
    sub(/:$/, "", e); cnt[e]++
    if (e in want) for (j = i + 2; j <= NF; j++) if (index($j, want[e] "=") == 1) { seen[e " " $j] = 1; break }
}
END {
    for (e in cnt) print "kpt-count", e, cnt[e]
    for (k in seen) { split(k, p, " "); d[p[1]]++ }
    for (e in d) print "kpt-distinct", e, d[e]
}' "$T/trace"
"""
    tail = r"""
kpt_teardown
[ -s "${TMPDIR:-/tmp}/kpt-trace-buffer-kb" ] && cat "${TMPDIR:-/tmp}/kpt-trace-buffer-kb" 2>/dev/null > "$T/buffer_size_kb"
rm -f "${TMPDIR:-/tmp}/kpt-trace-buffer-kb"
echo > "$T/trace"
"""
    parts = ["#!/bin/sh", "# kpatchtest: read and remove the SMM-boot probes",
             f"KPT_TRACEPOINTS={shlex.quote(_tracepoint_list())}",
             f"KPT_DISTINCT={shlex.quote(distinct)}", "KPT_MOUNT=0",
             _FIND_TRACEFS, _TEARDOWN, body]
    if teardown:
        parts.append(tail)
    parts.append("exit 0")
    return "\n".join(parts) + "\n"


def teardown_script() -> str:
    """Shell text that removes every kpt probe and disables the table's tracepoints."""
    return "\n".join(["#!/bin/sh", f"KPT_TRACEPOINTS={shlex.quote(_tracepoint_list())}", "KPT_MOUNT=0",
                      _FIND_TRACEFS, _TEARDOWN, '[ -n "$T" ] && kpt_teardown', "exit 0"]) + "\n"


# --- the Python side ---------------------------------------------------------------

@dataclass(frozen=True)
class ProbeState:
    metric: str
    kind: str
    target: str
    status: ProbeStatus
    symbol: str | None = None    # what was probed (may be a .constprop clone)


@dataclass(frozen=True)
class ProbeReading:
    metric: str
    unit: str
    value: int | None            # None: unavailable (no probe, or the buffer overran)
    probe: str | None            # "kprobe:kvm_tdp_mmu_get_vcpu_root_hpa" ...
    note: str = ""


_PROBE_LINE = re.compile(r"^kpt-probe (\S+) (tracepoint|kprobe|kretprobe) (\S+) (registered|missing|skipped)(?: (\S+))?\s*$")


def parse_setup(text: str) -> list[ProbeState]:
    """setup_script()'s output -> one ProbeState per candidate line."""
    out = []
    for line in text.splitlines():
        m = _PROBE_LINE.match(line.rstrip("\r"))
        if m:
            out.append(ProbeState(m[1], m[2], m[3], m[4], m[5]))  # type: ignore[arg-type]
    return out


@dataclass
class Collected:
    tracefs: str | None = None
    profile: dict[str, tuple[int, int]] | None = None   # event -> (hits, misses)
    counts: dict[str, int] | None = None
    distinct: dict[str, int] | None = None
    overrun: dict[str, int] | None = None               # cpu -> overrun

    @property
    def overran(self) -> bool:
        return any(v > 0 for v in (self.overrun or {}).values())


def parse_collect(text: str) -> Collected:
    c = Collected(profile={}, counts={}, distinct={}, overrun={})
    for raw in text.splitlines():
        f = raw.rstrip("\r").split()
        if not f:
            continue
        try:
            if f[0] == "kpt-tracefs" and len(f) == 2:
                c.tracefs = None if f[1] == "none" else f[1]
            elif f[0] == "kpt-profile" and len(f) == 4:
                c.profile[f[1]] = (int(f[2]), int(f[3]))
            elif f[0] == "kpt-count" and len(f) == 3:
                c.counts[f[1]] = int(f[2])
            elif f[0] == "kpt-distinct" and len(f) == 3:
                c.distinct[f[1]] = int(f[2])
            elif f[0] == "kpt-overrun" and len(f) == 3:
                c.overrun[f[1]] = int(f[2])
        except ValueError:
            continue
    return c


def parse_kprobe_profile(text: str) -> dict[str, tuple[int, int]]:
    """/sys/kernel/tracing/kprobe_profile -> {event: (hits, misses)}."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) == 3 and f[1].isdigit() and f[2].isdigit():
            out[f[0]] = (int(f[1]), int(f[2]))
    return out


_TS = re.compile(r"^\d+\.\d+:$")


def count_trace_events(text: str, distinct: dict[str, str] | None = None
                       ) -> tuple[dict[str, int], dict[str, int]]:
    """The text of /sys/kernel/tracing/trace -> ({event: lines}, {event: distinct values}).

    The event is the word after the timestamp, so task names with spaces ("CPU 0/KVM")
    and either flag-column width (5.10: 4, 6.x: 5) are fine. `distinct` maps an event to
    the field whose different values to count (e.g. {"root_allocs": "hpa"}).
    """
    counts: dict[str, int] = {}
    seen: dict[str, set[str]] = {}
    distinct = distinct or {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        f = line.split()
        for i in range(len(f) - 1):
            if _TS.match(f[i]):
                break
        else:
            continue
        ev = f[i + 1]
        if not ev.endswith(":"):
            continue
        ev = ev[:-1]
        counts[ev] = counts.get(ev, 0) + 1
        if ev in distinct:
            key = distinct[ev] + "="
            for tok in f[i + 2:]:
                if tok.startswith(key):
                    seen.setdefault(ev, set()).add(tok)
                    break
    return counts, {e: len(v) for e, v in seen.items()}


def _candidate(metric: str, kind: str, target: str) -> tuple[MetricProbes, Candidate] | None:
    for m in PROBES:
        if m.metric == metric:
            for c in m.candidates:
                if c.kind == kind and c.target == target:
                    return m, c
    return None


def read_probes(setup_out: str, collect_out: str) -> dict[str, ProbeReading]:
    """One reading per metric of PROBES. value None = unavailable, never 0 for that."""
    states = parse_setup(setup_out)
    col = parse_collect(collect_out)
    out: dict[str, ProbeReading] = {}
    for m in PROBES:
        took = [s for s in states if s.metric == m.metric and s.status == "registered"]
        if not took:
            mine = [s for s in states if s.metric == m.metric]
            tried = [s.target for s in mine if s.status == "missing"] if mine else [c.target for c in m.candidates]
            hot_off = [s.target for s in mine if s.status == "skipped"]
            note = f"no probe took (tried {', '.join(tried) or 'none'})"
            if hot_off:
                note += f"; not tried: {', '.join(hot_off)} (hot probe, off)"
            out[m.metric] = ProbeReading(m.metric, m.unit, None, None, note)
            continue
        s = took[0]
        found = _candidate(s.metric, s.kind, s.target)
        if found is None:
            out[m.metric] = ProbeReading(m.metric, m.unit, None, None, f"unknown probe {s.kind}:{s.target}")
            continue
        _, c = found
        label = c.label + (f" ({s.symbol})" if s.symbol and s.symbol not in (c.target, c.target.split(":")[-1])
                           else "")
        ev = c.event(m.metric)
        value: int | None
        note = c.note
        if col.tracefs is None:
            value, note = None, "tracefs gone at collect time"
        elif c.count == "profile":
            hit = (col.profile or {}).get(ev)
            value = hit[0] if hit else None
            if hit and hit[1]:
                note = (note + "; " if note else "") + f"{hit[1]} missed hits"
            if hit is None:
                note = "not in kprobe_profile"
        else:
            hit = (col.profile or {}).get(ev) if c.kind != "tracepoint" else None
            if hit and hit[1]:      # the handler did not run for those: a filtered count may be low
                note = (note + "; " if note else "") + f"{hit[1]} missed hits of {hit[0] + hit[1]}"
            if col.overran:
                value, note = None, "trace ring buffer overran: count unknown (raise buffer_kb)"
            elif c.count == "trace":
                value = (col.counts or {}).get(ev, 0)
            else:
                value = (col.distinct or {}).get(ev, 0)
        out[m.metric] = ProbeReading(m.metric, m.unit, value, label, note)
    return out


def probe_counts(setup_out: str, collect_out: str) -> dict[str, int | None]:
    """read_probes() reduced to {metric: count or None}."""
    return {k: r.value for k, r in read_probes(setup_out, collect_out).items()}


# KVM's debugfs counters worth reporting for this workload (all others are kept too).
KVM_STATS_OF_INTEREST = ("remote_tlb_flush", "remote_tlb_flush_requests", "mmu_shadow_zapped",
                         "mmu_cache_miss", "mmu_recycled", "pages_4k", "pages_2m", "pages_1g",
                         "exits", "io_exits", "mmio_exits", "pf_taken", "pf_fixed", "tlb_flush",
                         "nx_lpage_splits")
