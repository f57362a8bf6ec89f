#!/usr/bin/env bash
# Stand-in for kvm-unit-tests' run_tests.sh (see README.md in this directory).
#
# Same options, environment, logs and output as the real script:
#   plain:  "<colour>PASS<reset> NAME (SUMMARY)" / "... NAME (reason)" / "... NAME " per test
#   -t:     "TAP version 13", one "ok N - NAME: ..." per PASS/FAIL/SKIP line the test prints,
#           "not ok N - NAME: timeout; duration=T" / "terminated on SIGx" / "aborted", "1..N"
# and, like the real script, exit status 0 however the tests ended.

verbose="no"
tap_output="no"
run_all_tests="no"
list_tests="no"
only_group=""
only_tests=""

if [ ! -f config.mak ]; then
    echo "run ./configure && make first. See ./configure -h"
    exit 1
fi
# shellcheck disable=SC1091
source config.mak

usage()
{
    cat <<EOF

Usage: $0 [-h] [-v] [-a] [-g group] [-j NUM-TASKS] [-t] [-l]

    -h, --help          Output this help text
    -v, --verbose       Enables verbose mode
    -a, --all           Run all tests, including those flagged as 'nodefault'
    -g, --group         Only execute tests in the given group
    -j, --parallel      Execute tests in parallel (the stand-in runs them one by one)
    -t, --tap13         Output test results in TAP format
    -l, --list          Only output all tests list
EOF
}

getopt -T > /dev/null
if [ $? -ne 4 ]; then
    echo "Enhanced getopt is not available, add it to your PATH?"
    exit 1
fi
args=$(getopt -u -o ag:htj:vl -l all,group:,help,tap13,parallel:,verbose,list,probe-maxsmp -- "$@")
# shellcheck disable=SC2181
[ $? -ne 0 ] && exit 2
# shellcheck disable=SC2086
set -- $args
while [ $# -gt 0 ]; do
    case "$1" in
        -a|--all) run_all_tests="yes" ;;
        -g|--group) shift; only_group=$1 ;;
        -h|--help) usage; exit ;;
        -j|--parallel) shift
            if (( $1 <= 0 )); then echo "Invalid -j option: $1"; exit 2; fi ;;
        -v|--verbose) verbose="yes" ;;
        -t|--tap13) tap_output="yes" ;;
        -l|--list) list_tests="yes" ;;
        --probe-maxsmp|--) ;;
        *) only_tests="$only_tests $1" ;;
    esac
    shift
done

has_word() { grep -Fq " $1 " <<< " $2 "; }

colour() {
    case "$1" in
        PASS) echo -ne "\e[32mPASS\e[0m" ;;
        SKIP) echo -ne "\e[33mSKIP\e[0m" ;;
        FAIL) echo -ne "\e[31mFAIL\e[0m" ;;
    esac
}

# verdict STATUS NAME SUMMARY [REASON]: the per-test line (stdout; /dev/null under -t)
verdict() {
    if [ -z "$4" ]; then
        echo "$(colour "$1") $2 $3"
    else
        echo "$(colour "$1") $2 ($4)"
    fi
}

# tap "ok"|"not ok" TEXT [DIRECTIVE]: a TAP line on fd 3; number_tap numbers them
tap() {
    [ "$tap_output" = "yes" ] || return 0
    echo "$1 TEST_NUMBER - $2$3" >&3
}

number_tap() {
    local n=0 line
    while IFS= read -r line; do
        case "$line" in
            "ok TEST_NUMBER"*|"not ok TEST_NUMBER"*)
                n=$((n + 1))
                echo "${line/TEST_NUMBER/$n}" ;;
            *) echo "$line" ;;
        esac
    done
    echo "1..$n"
}

# log_lines NAME < output: append a test's output to its log; under -t also turn its
# PASS:/FAIL:/SKIP: lines into TAP (CRs stripped there, kept in plain mode)
log_lines() {
    local name="$1" line
    if [ "$tap_output" = "no" ]; then
        cat >> "$log"
        return
    fi
    while IFS= read -r line; do
        line="${line%$'\r'}"
        case "${line:0:4}" in
            PASS) tap "ok" "$name: ${line:6}" ;;
            FAIL) tap "not ok" "$name: ${line:6}" ;;
            SKIP) tap "ok" "$name: ${line:6}" " # skip" ;;
        esac
        printf '%s\n' "$line" >> "$log"
    done
}

# cmdline_for KERNEL: the x86/run command for the test being run (uses run_test's locals)
cmdline_for() {
    echo "TESTNAME=$name TIMEOUT=$timeout MACHINE=$machine ACCEL=$accel ./$TEST_SUBDIR/run $1 $smp $test_args $opts"
}

# run_test NAME GROUPS SMP KERNEL TEST_ARGS OPTS ARCH MACHINE CHECK ACCEL TIMEOUT
run_test() {
    local name="$1" groups="$2" smp="$3" kernel="$4" test_args="$5" opts="$6"
    local arch="$7" machine="$8" check="$9" accel="${10}" timeout="${TIMEOUT:-${11:-90s}}"
    local out err ret summary cmdline p path value log

    [ -n "$only_tests" ] && ! has_word "$name" "$only_tests" && return
    [ -n "$only_group" ] && ! has_word "$only_group" "$groups" && return

    if [ -z "$only_group" ] && has_word nodefault "$groups" && [ "$run_all_tests" != "yes" ]; then
        verdict SKIP "$name" "" "test marked as manual run only"; return
    fi
    if [ -n "$arch" ] && [ "$arch" != "$ARCH" ]; then
        verdict SKIP "$name" "" "$arch only"; return
    fi
    if [ -n "$machine" ] && [ -n "$MACHINE" ] && [ "$machine" != "$MACHINE" ]; then
        verdict SKIP "$name" "" "$machine only"; return
    elif [ -n "$MACHINE" ]; then
        machine="$MACHINE"
    fi
    if [ -n "$accel" ] && [ -n "$ACCEL" ] && [[ ! "$ACCEL" =~ ^$accel(,|$) ]]; then
        verdict SKIP "$name" "" "$accel only, but ACCEL=$ACCEL"; return
    elif [ -n "$ACCEL" ]; then
        accel="$ACCEL"
    fi
    for p in $check; do
        path=${p%%=*}; value=${p#*=}
        if ! [ -f "$path" ] || [ "$(cat "$path")" != "$value" ]; then
            verdict SKIP "$name" "" "$path not equal to $value"; return
        fi
    done
    if [ ! -f "$kernel" ]; then
        verdict SKIP "$name" "" "Test file '$kernel' not found"; return
    fi

    log="$unittest_log_dir/$name.log"
    out=$(mktemp) err=$(mktemp)

    # Would QEMU start at all? (the real script boots a kernel that does not exist and
    # looks for "could not load kernel"; anything else means QEMU cannot run the test)
    # (eval, as the real script does: the cfg's test_args and qemu_params may be quoted)
    eval "$(cmdline_for _NO_FILE_4Uhere_)" > "$out" 2> "$err"
    if ! grep -q "_NO_FILE_4Uhere_" "$err" ||
       ! grep "_NO_FILE_4Uhere_" "$err" | grep -q -e "[Cc]ould not \(load\|open\) kernel"; then
        log_lines "$name" < <(cat "$out" "$err")
        verdict SKIP "$name" "" "$(tail -1 "$err")"
        rm -f "$out" "$err"
        return
    fi

    cmdline=$(cmdline_for "$kernel")
    [ "$verbose" = "yes" ] && echo "$cmdline"
    # the guest's output reaches the log as it comes (a hung test leaves a partial log)
    { eval "$cmdline" 2> "$err"; echo $? > "$out.rc"; } | tee "$out" | log_lines "$name"
    ret=$(cat "$out.rc")
    summary=$(tail -5 "$out" | grep '^SUMMARY: ' | sed 's/^SUMMARY: /(/;s/\r\{0,1\}$/)/')
    log_lines "$name" < "$err"
    log_lines "$name" <<< ""
    rm -f "$out" "$out.rc" "$err"

    if [ $ret -eq 0 ]; then
        verdict PASS "$name" "$summary"
    elif [ $ret -eq 77 ]; then
        verdict SKIP "$name" "$summary"
    elif [ $ret -eq 124 ]; then
        verdict FAIL "$name" "" "timeout; duration=$timeout"
        tap "not ok" "$name: timeout; duration=$timeout"
    elif [ $ret -gt 127 ]; then
        verdict FAIL "$name" "" "terminated on SIG$(kill -l $((ret - 128)))"
        tap "not ok" "$name: terminated on SIG$(kill -l $((ret - 128)))"
    elif [ $ret -eq 127 ] && [ "$tap_output" = "yes" ]; then
        tap "not ok" "$name: aborted"
    else
        verdict FAIL "$name" "$summary"
    fi
}

# for_each_test FUNCTION: call it for every [section] of the cfg, in file order
for_each_test() {
    local line name="" groups smp kernel test_args opts arch machine check accel timeout
    while IFS= read -r line || [ -n "$line" ]; do
        if [[ "$line" =~ ^\[(.*)\]$ ]]; then
            [ -n "$name" ] && "$1" "$name" "$groups" "$smp" "$kernel" "$test_args" "$opts" \
                "$arch" "$machine" "$check" "$accel" "$timeout"
            name=${BASH_REMATCH[1]}
            groups="" smp="-smp 1" kernel="" test_args="" opts="" arch="" machine=""
            check="" accel="" timeout=""
        elif [[ "$line" =~ ^file\ *=\ *(.*)$ ]]; then kernel=$TEST_DIR/${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^smp\ *=\ *(.*)$ ]]; then smp="-smp ${BASH_REMATCH[1]}"
        elif [[ "$line" =~ ^test_args\ *=\ *(.*)$ ]]; then test_args="-append ${BASH_REMATCH[1]}"
        elif [[ "$line" =~ ^(extra_params|qemu_params)\ *=\ *(.*)$ ]]; then opts=${BASH_REMATCH[2]}
        elif [[ "$line" =~ ^groups\ *=\ *(.*)$ ]]; then groups=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^arch\ *=\ *(.*)$ ]]; then arch=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^machine\ *=\ *(.*)$ ]]; then machine=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^check\ *=\ *(.*)$ ]]; then check=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^accel\ *=\ *(.*)$ ]]; then accel=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^timeout\ *=\ *(.*)$ ]]; then timeout=${BASH_REMATCH[1]}
        fi
    done < "$TEST_DIR/unittests.cfg"
    [ -n "$name" ] && "$1" "$name" "$groups" "$smp" "$kernel" "$test_args" "$opts" \
        "$arch" "$machine" "$check" "$accel" "$timeout"
}

list_one() {
    if [ -n "$only_group" ] && ! has_word "$only_group" "$2"; then
        return
    fi
    echo "$1"
}

if [ "$list_tests" = "yes" ]; then
    for_each_test list_one
    exit
fi

: "${unittest_log_dir:=logs}"
rm -rf "$unittest_log_dir.old"
[ -d "$unittest_log_dir" ] && mv "$unittest_log_dir" "$unittest_log_dir.old"
mkdir "$unittest_log_dir" || exit 2
echo "BUILD_HEAD=$(cat build-head)" > "$unittest_log_dir/SUMMARY"

if [ "$tap_output" = "yes" ]; then
    echo "TAP version 13"
    ( exec 3>&1 > /dev/null; for_each_test run_test ) | number_tap
else
    exec 3>/dev/null
    for_each_test run_test
fi

wait
