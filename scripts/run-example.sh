#!/usr/bin/env bash
# Watch quebert work: start a worker on examples/med.py, enqueue the example
# tasks (examples/produce.py), show the worker's log while the tasks run,
# retry with backoff and fail into the errored queue, then stop the worker.
#
#     bash scripts/run-example.sh
#     DEMO_SECONDS=60 bash scripts/run-example.sh   # watch longer [25]
#
# By default it uses RabbitMQ's vhost / and Redis database 0 on this
# machine (examples/config.json).  On a shared machine, point it elsewhere:
#
#     QUEBERT_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/demo \
#     QUEBERT_REDIS_URL=redis://127.0.0.1:6379/5 QUEBERT_PREFIX=demo: \
#         bash scripts/run-example.sh
#
# (the vhost must exist; the quebert commands it suggests at the end read
# the same variables).  Sets up what is missing first (scripts/bootstrap.sh;
# QUEBERT_SKIP_BOOTSTRAP=1 skips that).  Ctrl-C stops the worker too.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

demo_seconds="${DEMO_SECONDS:-25}"
start_timeout="${WORKER_START_TIMEOUT:-60}"
config="examples/config.json"
case "$demo_seconds" in
    '' | *[!0-9]*) echo "run-example: DEMO_SECONDS must be a whole number of seconds, not '$demo_seconds'" >&2; exit 2 ;;
esac

if [ "${QUEBERT_SKIP_BOOTSTRAP:-}" != 1 ]; then
    QUEBERT_SKIP_BROWSER=1 bash scripts/bootstrap.sh
fi

# The producer and the suggested quebert commands read QUEBERT_* themselves;
# twistd does not, so the worker gets them as options.
targets=()
if [ -n "${QUEBERT_AMQP_URL:-}" ]; then targets+=(--amqp-url "$QUEBERT_AMQP_URL"); fi
if [ -n "${QUEBERT_REDIS_URL:-}" ]; then targets+=(--redis-url "$QUEBERT_REDIS_URL"); fi
if [ -n "${QUEBERT_PREFIX:-}" ]; then targets+=(--state-prefix "$QUEBERT_PREFIX"); fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

workdir="$(mktemp -d "${TMPDIR:-/tmp}/quebert-example.XXXXXX")"
worker_log="$workdir/worker.log"
produced="$workdir/produced.txt"
worker_pid=""
tail_pid=""
sleep_pid=""

stop_worker() {
    # SIGTERM lets twistd drain (shutdown_timeout in the config), then KILL.
    if [ -n "$worker_pid" ] && kill -0 "$worker_pid" 2>/dev/null; then
        echo "run-example: stopping the worker (SIGTERM to pid $worker_pid)"
        kill -TERM "$worker_pid" 2>/dev/null || true
        local _
        for _ in $(seq 1 60); do
            kill -0 "$worker_pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$worker_pid" 2>/dev/null; then
            echo "run-example: worker still running after 30 s; sending SIGKILL"
            kill -KILL "$worker_pid" 2>/dev/null || true
        fi
    fi
    if [ -n "$worker_pid" ]; then
        worker_status=0
        wait "$worker_pid" 2>/dev/null || worker_status=$?
        worker_pid=""
    fi
}

finish_log() {
    # tail notices the worker is gone within a second and prints the rest.
    if [ -n "$tail_pid" ]; then
        local _
        for _ in $(seq 1 10); do
            kill -0 "$tail_pid" 2>/dev/null || break
            sleep 0.3
        done
        kill "$tail_pid" 2>/dev/null || true
        wait "$tail_pid" 2>/dev/null || true
        tail_pid=""
    fi
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$sleep_pid" ]; then
        kill "$sleep_pid" 2>/dev/null || true
    fi
    stop_worker
    finish_log
    rm -rf "$workdir"
    exit "$status"
}
trap cleanup EXIT
trap 'echo; echo "run-example: interrupted"; exit 130' INT
trap 'exit 143' TERM

# How many queues the worker will consume: wait until it consumes them all.
queues="$(.venv/bin/python -c '
import json, sys
data = json.load(open(sys.argv[1]))
print(len(data.get("queues") or [None]))' "$config")"

cmd=(.venv/bin/twistd --pidfile= -n amqp-worker --config "$config" ${targets[@]+"${targets[@]}"})
echo "run-example: starting the worker: ${cmd[*]}"
: >"$worker_log"  # exists before tail opens it
"${cmd[@]}" >"$worker_log" 2>&1 </dev/null &
worker_pid=$!
# The log goes to the terminal too; tail ends by itself once the worker has.
tail -n +1 -f --pid="$worker_pid" "$worker_log" | sed -u 's/^/  worker | /' &
tail_pid=$!

deadline=$((SECONDS + start_timeout))
while :; do
    consuming="$(grep -c 'consuming .* (prefetch' "$worker_log" || true)"
    if [ "$consuming" -ge "$queues" ]; then
        break
    fi
    if ! kill -0 "$worker_pid" 2>/dev/null; then
        worker_status=0
        wait "$worker_pid" || worker_status=$?
        worker_pid=""
        echo "run-example: the worker exited with status $worker_status before consuming" \
             "(its log is above)" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "run-example: the worker is not consuming its $queues queue(s) after" \
             "${start_timeout}s (its log is above)" >&2
        exit 1
    fi
    sleep 0.5
done
echo "run-example: the worker consumes its $queues queue(s); enqueueing the example tasks"

if ! .venv/bin/python -m examples.produce | sed -u 's/^/  produce | /' | tee "$produced"; then
    echo "run-example: enqueueing failed" >&2
    exit 1
fi

echo "run-example: watching the worker for ${demo_seconds}s: flaky fails twice and" \
     "succeeds after backoffs of 1 s and 2 s; always_fails spends its 3 attempts and" \
     "lands in low.errored"
# In the background so that a signal to this script is handled at once
# (bash runs traps only between foreground commands).
sleep "$demo_seconds" &
sleep_pid=$!
wait "$sleep_pid"
sleep_pid=""

stop_worker
finish_log
final_status=0
case "${worker_status:-?}" in
    0 | 143) echo "run-example: the worker has stopped cleanly" ;;  # twistd re-raises SIGTERM
    *) echo "run-example: the worker exited with status ${worker_status:-?}" >&2; final_status=1 ;;
esac

ids="$(sed -n 's/^  produce | \([0-9A-Za-z_-]\{8,\}\) .*/\1/p' "$produced")"
first_id="$(printf '%s\n' "$ids" | head -n 1)"
cat <<EOF

Done.  The tasks' states are kept in Redis; inspect them with:

    .venv/bin/quebert status ${first_id:-TASK_ID}
        # one task: state, attempts, result, error, per-attempt history
    .venv/bin/quebert list                   # recent tasks, one JSON line each
    .venv/bin/quebert list --state failed    # only the failed ones
EOF
if [ -n "$ids" ]; then
    echo
    echo "Task ids enqueued by this run:"
    printf '%s\n' "$ids" | sed 's/^/    /'
fi
cat <<EOF

always_fails is now in RabbitMQ's low.errored queue:

    rabbitmqctl list_queues name messages | grep errored
EOF
exit "$final_status"
