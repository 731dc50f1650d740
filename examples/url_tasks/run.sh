#!/usr/bin/env bash
# URL tasks and the HTTP task API, end to end, with nothing but curl.
#
#     bash scripts/bootstrap.sh            # once: .venv, RabbitMQ, Redis
#     bash examples/url_tasks/run.sh
#
# Starts a small target HTTP server (target.py) and a worker serving the
# HTTP API (twistd amqp-worker --http-port), then talks to the API with
# curl: a URL task to /hello, one to /flaky (fails twice, retried), a named
# task pushed twice (the second push gets 409), a slow task cancelled while
# it runs, the task list, /queues and /health.  Everything started here is
# stopped on exit, Ctrl-C included.  See README.rst in this directory.
#
# Environment (defaults in brackets):
#   AMQP_URL      RabbitMQ   [amqp://guest:guest@127.0.0.1:5672/%2F]
#   REDIS_URL     Redis      [redis://127.0.0.1:6379/0]
#   STATE_PREFIX  Redis key prefix of the task state [quebert-example:]
#   TARGET_PORT   port of the target server on 127.0.0.1 [8765]
#   API_PORT      port of the HTTP API on 127.0.0.1 [8780]
#   API_TOKEN     the API's read-write token [random]
#   QUEBERT_VENV  the virtualenv [.venv at the top of the checkout]
#
# It uses the queue url-example (and url-example.errored) and the Redis keys
# under STATE_PREFIX, and deletes nothing: task records expire after an hour
# (state.ttl in config.json).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${QUEBERT_VENV:-$root/.venv}"
py="$venv/bin/python"
twistd="$venv/bin/twistd"

AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
STATE_PREFIX="${STATE_PREFIX:-quebert-example:}"
TARGET_PORT="${TARGET_PORT:-8765}"
API_PORT="${API_PORT:-8780}"
QUEUE="url-example"

# shellcheck source=examples/lib.sh
. "$root/examples/lib.sh"

for tool in curl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is needed (apt-get install $tool)"
done
[ -x "$twistd" ] && [ -x "$py" ] \
    || die "no quebert virtualenv at $venv: run 'bash scripts/bootstrap.sh' first"

API_TOKEN="${API_TOKEN:-$("$py" -c 'import secrets; print(secrets.token_urlsafe(24))')}"
RUN_ID="$("$py" -c 'import uuid; print(uuid.uuid4().hex[:8])')"
API="http://127.0.0.1:$API_PORT"
TARGET="http://127.0.0.1:$TARGET_PORT"

port_busy "$TARGET_PORT" && die "port $TARGET_PORT is in use: set TARGET_PORT to a free port"
port_busy "$API_PORT" && die "port $API_PORT is in use: set API_PORT to a free port"

workdir="$(mktemp -d "${TMPDIR:-/tmp}/quebert-url-example.XXXXXX")"
worker_log="$workdir/worker.log"
worker_pid=""
target_pid=""

# shellcheck disable=SC2317  # invoked by the traps
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$worker_pid" ]; then
        say "stopping the worker (SIGTERM: running tasks get 5 s) and the target server"
        stop_pid "$worker_pid" 20
    fi
    stop_pid "$target_pid" 5
    if [ "$status" -ne 0 ] && [ -s "$worker_log" ]; then
        echo "---- last lines of the worker's log ----"
        tail -n 40 "$worker_log"
    fi
    rm -rf "$workdir"
    exit "$status"
}
trap cleanup EXIT
trap 'echo; echo "run.sh: interrupted"; exit 130' INT
trap 'exit 143' TERM

# -- helpers ------------------------------------------------------------------

# api METHOD PATH [JSON]: call the API with the token; sets $code and $body.
# QUIET=1 api ... prints nothing.
api() {
    local method=$1 path=$2 data=${3:-} out
    local args=(-sS -X "$method" -H "Authorization: Bearer $API_TOKEN" -w '\n%{http_code}')
    if [ -n "$data" ]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$data")
    fi
    if [ -z "${QUIET:-}" ]; then
        if [ -n "$data" ]; then
            printf '$ curl -X %s %s -H "Authorization: Bearer $TOKEN" \\\n' "$method" "$API$path"
            printf "       -H 'Content-Type: application/json' -d '%s'\n" "$data"
        else
            printf '$ curl -X %s %s -H "Authorization: Bearer $TOKEN"\n' "$method" "$API$path"
        fi
    fi
    out="$(curl "${args[@]}" "$API$path")" || die "curl $method $path failed"
    code="${out##*$'\n'}"
    body="${out%$'\n'*}"
    if [ -z "${QUIET:-}" ]; then
        echo "HTTP $code"
        show
    fi
}

# wait_state ID SECONDS STATE...: poll GET /tasks/ID until its state is one of STATEs.
wait_state() {
    local id=$1 wait_s=$2 deadline state
    shift 2
    deadline=$((SECONDS + wait_s))
    while :; do
        QUIET=1 api GET "/tasks/$id"
        state="$(json 'd["state"]')"
        for want in "$@"; do
            [ "$state" = "$want" ] && return 0
        done
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "run.sh: task $id is still $state after ${wait_s}s (wanted: $*)"
            return 1
        fi
        sleep 0.2
    done
}


# -- start the target and the worker --------------------------------------------

say "starting the target server on $TARGET (target.py)"
TARGET_PORT="$TARGET_PORT" PYTHONUNBUFFERED=1 "$py" "$here/target.py" \
    > >(sed -u 's/^/  target | /') 2>&1 </dev/null &
target_pid=$!

say "starting the worker with the HTTP API on $API"
echo "$ QUEBERT_API_TOKEN=\$TOKEN twistd -n amqp-worker --config examples/url_tasks/config.json \\"
echo "      --amqp-url ... --redis-url ... --state-prefix $STATE_PREFIX --http-port $API_PORT"
cd "$root"
env QUEBERT_API_TOKEN="$API_TOKEN" "$twistd" --pidfile= -n --logfile="$worker_log" \
    amqp-worker --config "$here/config.json" --amqp-url "$AMQP_URL" \
    --redis-url "$REDIS_URL" --state-prefix "$STATE_PREFIX" --http-port "$API_PORT" \
    </dev/null >>"$worker_log" 2>&1 &
worker_pid=$!

deadline=$((SECONDS + 60))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$API/health" 2>/dev/null)" = 200 ] \
        && grep -q "consuming $QUEUE" "$worker_log" \
        && port_busy "$TARGET_PORT"; do
    kill -0 "$worker_pid" 2>/dev/null || { worker_pid=""; die "the worker exited while starting"; }
    kill -0 "$target_pid" 2>/dev/null || { target_pid=""; die "the target server exited"; }
    [ "$SECONDS" -lt "$deadline" ] || die "the worker is not ready after 60 s"
    sleep 0.3
done
echo "the worker consumes $QUEUE and /health answers 200"

# -- 1. a URL task -------------------------------------------------------------

say "1. push a URL task: POST $TARGET/hello with a JSON body"
api POST /tasks "{\"kind\": \"url\", \"url\": \"$TARGET/hello\", \"method\": \"POST\",
  \"headers\": {\"Content-Type\": \"application/json\"}, \"body\": \"{\\\"greeting\\\": \\\"hi\\\"}\",
  \"queue\": \"$QUEUE\"}"
[ "$code" = 201 ] || die "expected 201 Created"
hello="$(json 'd["id"]')"
wait_state "$hello" 20 succeeded failed || true
echo "the task's record once it ran:"
QUIET=1 api GET "/tasks/$hello"
show
check hello "state=$(json 'd["state"]') attempts=$(json 'd["attempts"]')" \
    "$(json 'd["state"]')" succeeded

# -- 2. a flaky target: retried with backoff ---------------------------------------

say "2. push a URL task to /flaky, which answers 503 twice: retried after 0.5-1 s"
api POST /tasks "{\"kind\": \"url\", \"url\": \"$TARGET/flaky\", \"method\": \"GET\",
  \"queue\": \"$QUEUE\", \"retry\": {\"max_attempts\": 5, \"min_backoff\": 0.5, \"max_backoff\": 2}}"
[ "$code" = 201 ] || die "expected 201 Created"
flaky="$(json 'd["id"]')"
wait_state "$flaky" 30 succeeded failed || true
QUIET=1 api GET "/tasks/$flaky"
echo "its attempts (history):"
json '"\n".join("    attempt %s: %s%s" % (h["attempt"], h["state"], " (" + str((h.get("error") or {}).get("message")) + ")" if h.get("error") else "") for h in d["history"])'
check flaky "state=$(json 'd["state"]') attempts=$(json 'd["attempts"]')" \
    "$(json 'd["state"]') $(json 'd["attempts"]')" "succeeded 3"

# -- 3. a named task, pushed twice -------------------------------------------------

name="example-greeting-$RUN_ID"
say "3. push a task named $name twice: the name is taken, the second push gets 409"
named_body="{\"kind\": \"url\", \"url\": \"$TARGET/hello\", \"queue\": \"$QUEUE\", \"name\": \"$name\"}"
api POST /tasks "$named_body"
[ "$code" = 201 ] || die "expected 201 Created"
first="$(json 'd["id"]')"
api POST /tasks "$named_body"
check duplicate "second push: HTTP $code $(json 'd.get("error", {}).get("code")')" \
    "$code $(json 'd.get("error", {}).get("code")')" "409 task_already_exists"
wait_state "$first" 20 succeeded failed || true

# -- 4. cancel a running task --------------------------------------------------------

say "4. push a URL task to /slow (answers after 30 s) and cancel it while it runs"
api POST /tasks "{\"kind\": \"url\", \"url\": \"$TARGET/slow\", \"method\": \"GET\", \"queue\": \"$QUEUE\"}"
[ "$code" = 201 ] || die "expected 201 Created"
slow="$(json 'd["id"]')"
wait_state "$slow" 20 running || true
echo "it is running; cancel it:"
api DELETE "/tasks/$slow"
wait_state "$slow" 10 canceled succeeded failed || true
QUIET=1 api GET "/tasks/$slow"
check slow "state=$(json 'd["state"]') reason=$(json 'd["reason"]')" \
    "$(json 'd["state"]')" canceled
echo "cancelling it again is a conflict:"
api DELETE "/tasks/$slow"

# -- 5. looking around ---------------------------------------------------------------

say "5. the latest tasks of the queue (GET /tasks?queue=$QUEUE&limit=10), one line each"
QUIET=1 api GET "/tasks?queue=$QUEUE&limit=10"
echo "\$ curl '$API/tasks?queue=$QUEUE&limit=10' -H \"Authorization: Bearer \$TOKEN\""
echo "HTTP $code"
json '"\n".join("    %-32s %-9s attempts=%s  %s  %s" % (t["id"], t["state"], t["attempts"], t["task"], t.get("name") or "") for t in d["tasks"])'

say "6. the queues"
api GET /queues

say "7. health (no token needed)"
echo "\$ curl $API/health"
out="$(curl -sS -w '\n%{http_code}' "$API/health")"
code="${out##*$'\n'}"
body="${out%$'\n'*}"
echo "HTTP $code"
show

say "summary"
if [ "$failures" -eq 0 ]; then
    echo "all checks passed"
else
    echo "$failures check(s) failed"
    exit 1
fi
