#!/usr/bin/env bash
# Run quebert's whole test suite against the local RabbitMQ and Redis, then
# ruff, then build the docs with warnings as errors (scripts/build-docs.sh).
# Sets up what is missing first (scripts/bootstrap.sh).
#
#     bash scripts/run-tests.sh                    # everything
#     bash scripts/run-tests.sh tests.test_retry   # extra args go to trial
#
# With no arguments, two trial runs, one after the other: the normal suite
# (every test module but tests/faults), then the fault suite (tests.faults:
# workers killed, RabbitMQ stopped, Redis cut off; docs/reliability.rst) in
# its own process, because it stops RabbitMQ and would break any test
# running beside it.  Its summary table is printed and, when it passed,
# written into docs/reliability.rst.
#
# QUEBERT_VENV=DIR runs the tools of another virtualenv (tox sets its own)
# and QUEBERT_SKIP_BOOTSTRAP=1 skips scripts/bootstrap.sh (the caller has set
# up the environment and started RabbitMQ and Redis).
#
# Exits non-zero when a trial run, ruff or the docs build fails.  The tests run in one
# process per run (no `trial --jobs`): the integration tests share the
# local servers.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

venv="${QUEBERT_VENV:-$root/.venv}"
if [ "${QUEBERT_SKIP_BOOTSTRAP:-}" != 1 ]; then
    bash scripts/bootstrap.sh
fi

logs=()
# The 3-node test cluster (scripts/rabbitmq-cluster.sh, tests/_cluster.py)
# is stopped by the trial process that started it; this also stops it when
# trial died first (unless QUEBERT_CLUSTER_KEEP=1 or another run uses it).
cleanup() {
    rm -f "${logs[@]}"
    bash scripts/rabbitmq-cluster.sh stop-unused </dev/null || true
}
trap cleanup EXIT

summaries=()
failures=()
trial_status=0

# failed_tests LOG: one line per failing test of a trial log, from trial's
# closing report ("[FAIL]" or "[ERROR]", the traceback, then the test ids),
# with the last line of its traceback, so that the end of the output names
# them even when only the tail of a long run is kept.
failed_tests() {
    awk '
        /^={20,}$/ { block = ""; next }
        /^\[(FAIL|ERROR|UNEXPECTED SUCCESS)\]$/ { block = $0; last = ""; next }
        block != "" && /^tests\.[A-Za-z0-9_.]+$/ {
            print block " " $0 (last != "" ? ": " substr(last, 1, 200) : "")
            next
        }
        block != "" && NF { last = $0 }
    ' "$1" | head -n 40
}

# run_trial LABEL ARGS...: one trial run, its summary line kept for the end.
run_trial() {
    local label="$1" log status=0 summary
    shift
    log="$(mktemp "${TMPDIR:-/tmp}/quebert-trial.XXXXXX")"
    logs+=("$log")
    echo "run-tests: $venv/bin/python -m twisted.trial $*"
    local started=$SECONDS
    "$venv/bin/python" -m twisted.trial "$@" 2>&1 | tee "$log" || status=$?
    summary="$(grep -E '^(PASSED|FAILED)( |$)' "$log" | tail -n 1 || true)"
    if [ -z "$summary" ]; then
        summary="no trial summary line (trial exited with status $status)"
        [ "$status" -eq 0 ] && status=1
    fi
    summaries+=("$label: $summary ($((SECONDS - started))s)")
    local line
    while IFS= read -r line; do
        failures+=("$label: $line")
    done < <(failed_tests "$log")
    if [ "$status" -ne 0 ] && [ "$trial_status" -eq 0 ]; then
        trial_status=$status
    fi
    return "$status"
}

faults_status=skipped
if [ "$#" -eq 0 ]; then
    normal=()
    for path in tests/test_*.py; do
        module="${path%.py}"
        normal+=("${module//\//.}")
    done
    for path in tests/*/; do
        path="${path%/}"
        if [ -f "$path/__init__.py" ] && [ "$path" != tests/faults ]; then
            normal+=("${path//\//.}")
        fi
    done
    run_trial "trial" "${normal[@]}" || true
    faults_status=0
    run_trial "faults" --temp-directory=_trial_temp.faults tests.faults || faults_status=$?
else
    run_trial "trial" "$@" || true
fi

lint_paths=()
for path in quebert tests twisted examples bench; do
    [ -e "$path" ] && lint_paths+=("$path")
done
echo "run-tests: $venv/bin/ruff check ${lint_paths[*]}"
ruff_status=0
"$venv/bin/ruff" check "${lint_paths[@]}" || ruff_status=$?

# The docs site, warnings as errors: a broken reference fails the run.
echo "run-tests: bash scripts/build-docs.sh"
docs_status=0
QUEBERT_SKIP_BOOTSTRAP=1 QUEBERT_VENV="$venv" bash scripts/build-docs.sh || docs_status=$?

count() {  # count NAME: the sum of the numbers after NAME= in every trial summary
    local total=0 n summary
    for summary in "${summaries[@]}"; do
        n="$(grep -oE "$1=[0-9]+" <<<"$summary" | head -n 1 | cut -d= -f2 || true)"
        total=$(( total + ${n:-0} ))
    done
    echo "$total"
}
passed="$(count successes)"
failed=$(( $(count failures) + $(count errors) + $(count unexpectedSuccesses) ))
skipped="$(count skips)"

if [ "$faults_status" != skipped ]; then
    echo
    report_args=(--dir _trial_temp.faults/faults-summary)
    if [ "$faults_status" -eq 0 ]; then
        report_args+=(--write-docs docs/reliability.rst)
    fi
    "$venv/bin/python" -m tests.faults.report "${report_args[@]}" || true
fi

echo
for summary in "${summaries[@]}"; do
    echo "$summary"
done
echo "tests: $passed passed, $failed failed, $skipped skipped"
for line in "${failures[@]}"; do
    echo "  $line"
done
if [ "$ruff_status" -eq 0 ]; then
    echo "ruff:  passed"
else
    echo "ruff:  FAILED (status $ruff_status)"
fi
if [ "$docs_status" -eq 0 ]; then
    echo "docs: passed"
else
    echo "docs: FAILED (status $docs_status)"
fi

if [ "$trial_status" -ne 0 ]; then
    exit "$trial_status"
fi
if [ "$ruff_status" -ne 0 ]; then
    exit "$ruff_status"
fi
exit "$docs_status"
