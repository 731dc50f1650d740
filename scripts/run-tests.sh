#!/usr/bin/env bash
# Run quebert's whole test suite against the local RabbitMQ and Redis, then
# ruff.  Sets up what is missing first (scripts/bootstrap.sh).
#
#     bash scripts/run-tests.sh                    # everything
#     bash scripts/run-tests.sh tests.test_retry   # extra args go to trial
#
# Exits non-zero when trial or ruff fails.  The tests run in one process
# (no `trial --jobs`): the integration tests share the local servers.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/bootstrap.sh

if [ "$#" -eq 0 ]; then
    set -- tests
fi

log="$(mktemp "${TMPDIR:-/tmp}/quebert-trial.XXXXXX")"
trap 'rm -f "$log"' EXIT

echo "run-tests: .venv/bin/python -m twisted.trial $*"
trial_status=0
.venv/bin/python -m twisted.trial "$@" 2>&1 | tee "$log" || trial_status=$?

summary="$(grep -E '^(PASSED|FAILED)( |$)' "$log" | tail -n 1 || true)"
if [ -z "$summary" ]; then
    summary="no trial summary line (trial exited with status $trial_status)"
    [ "$trial_status" -eq 0 ] && trial_status=1
fi

lint_paths=()
for path in quebert tests twisted examples bench; do
    [ -e "$path" ] && lint_paths+=("$path")
done
echo "run-tests: .venv/bin/ruff check ${lint_paths[*]}"
ruff_status=0
.venv/bin/ruff check "${lint_paths[@]}" || ruff_status=$?

count() {  # count NAME: the number after NAME= in trial's summary, or 0
    local n
    n="$(grep -oE "$1=[0-9]+" <<<"$summary" | head -n 1 | cut -d= -f2 || true)"
    echo "${n:-0}"
}
passed="$(count successes)"
failed=$(( $(count failures) + $(count errors) + $(count unexpectedSuccesses) ))
skipped="$(count skips)"

echo
echo "trial: $summary"
echo "tests: $passed passed, $failed failed, $skipped skipped"
if [ "$ruff_status" -eq 0 ]; then
    echo "ruff:  passed"
else
    echo "ruff:  FAILED (status $ruff_status)"
fi

if [ "$trial_status" -ne 0 ]; then
    exit "$trial_status"
fi
exit "$ruff_status"
