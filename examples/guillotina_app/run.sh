#!/usr/bin/env bash
# A Guillotina 7 application publishing tasks to a quebert worker, end to end.
#
#     bash scripts/bootstrap.sh             # once: .venv (with Guillotina), RabbitMQ, Redis
#     bash examples/guillotina_app/run.sh
#
# Starts the shop application (shop_app.py, with quebert.bridge.guillotina)
# under `guillotina serve` and a worker running shop_tasks.py, then with curl:
# creates a container, places an order (a call task and a URL task that
# calls back into the application with the workers' service token), reads
# both through @amqp-tasks, cancels a scheduled report with DELETE
# @amqp-tasks/{id}, shows that an anonymous caller is refused, and publishes
# a task the way an unmodified guillotina_amqp producer does.  Last, it
# checks that the caller's credentials are nowhere in RabbitMQ or Redis.
# Everything started here is stopped on exit.  See README.rst here.
#
# Environment (defaults in brackets):
#   AMQP_URL          RabbitMQ   [amqp://guest:guest@127.0.0.1:5672/%2F]
#   REDIS_URL         Redis      [redis://127.0.0.1:6379/0]
#   STATE_PREFIX      Redis key prefix of the task state [quebert-guillotina-example:]
#   GUILLOTINA_PORT   port of the application on 127.0.0.1 [8790]
#   QUEBERT_VENV      the virtualenv [.venv at the top of the checkout]
#
# It uses the queue guillotina-example (and .errored) and Redis keys under
# STATE_PREFIX, and deletes nothing: records expire after an hour.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${QUEBERT_VENV:-$root/.venv}"
py="$venv/bin/python"
twistd="$venv/bin/twistd"
guillotina="$venv/bin/guillotina"

AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
STATE_PREFIX="${STATE_PREFIX:-quebert-guillotina-example:}"
GUILLOTINA_PORT="${GUILLOTINA_PORT:-8790}"
QUEUE="guillotina-example"
APP="http://127.0.0.1:$GUILLOTINA_PORT"

# shellcheck source=examples/lib.sh
. "$root/examples/lib.sh"

command -v curl >/dev/null 2>&1 || die "curl is needed (apt-get install curl)"
[ -x "$twistd" ] && [ -x "$guillotina" ] \
    || die "no quebert virtualenv with Guillotina at $venv: run 'bash scripts/bootstrap.sh'"

port_busy "$GUILLOTINA_PORT" && die "port $GUILLOTINA_PORT is in use: set GUILLOTINA_PORT"

ROOT_PASSWORD="$("$py" -c 'import secrets; print(secrets.token_urlsafe(18))')"
SERVICE_TOKEN="$("$py" -c 'import secrets; print(secrets.token_urlsafe(32))')"
workdir="$(mktemp -d "${TMPDIR:-/tmp}/quebert-guillotina-example.XXXXXX")"
worker_log="$workdir/worker.log"
app_log="$workdir/guillotina.log"
worker_pid=""
app_pid=""

# shellcheck disable=SC2317  # invoked by the traps
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    say "stopping the worker and the application"
    stop_pid "$worker_pid" 20
    stop_pid "$app_pid" 10
    if [ "$status" -ne 0 ]; then
        echo "---- last lines of the worker's log ----"
        tail -n 30 "$worker_log" 2>/dev/null || true
        echo "---- last lines of the application's log ----"
        tail -n 30 "$app_log" 2>/dev/null || true
    fi
    rm -rf "$workdir"
    exit "$status"
}
trap cleanup EXIT
trap 'echo; echo "run.sh: interrupted"; exit 130' INT
trap 'exit 143' TERM

# -- helpers ------------------------------------------------------------------

# call METHOD PATH [JSON]: call the application as root (AUTH=none: anonymous);
# sets $code and $body.  QUIET=1 call ... prints nothing.
call() {
    local method=$1 path=$2 data=${3:-} out
    local args=(-sS -X "$method" -w '\n%{http_code}')
    [ "${AUTH:-root}" = none ] || args+=(-u "root:$ROOT_PASSWORD")
    [ -z "$data" ] || args+=(-H 'Content-Type: application/json' --data-binary "$data")
    if [ -z "${QUIET:-}" ]; then
        local who='-u root:$PASSWORD '
        [ "${AUTH:-root}" = none ] && who=''
        if [ -n "$data" ]; then
            printf "\$ curl -X %s %s%s -d '%s'\n" "$method" "$who" "$APP$path" "$data"
        else
            printf '$ curl -X %s %s%s\n' "$method" "$who" "$APP$path"
        fi
    fi
    out="$(curl "${args[@]}" "$APP$path")" || die "curl $method $path failed"
    code="${out##*$'\n'}"
    body="${out%$'\n'*}"
    if [ -z "${QUIET:-}" ]; then
        echo "HTTP $code"
        show
    fi
}

# wait_state ID SECONDS STATE: poll GET @amqp-tasks/ID until the task is in STATE.
wait_state() {
    local id=$1 wait_s=$2 want=$3 deadline state
    deadline=$((SECONDS + wait_s))
    while :; do
        QUIET=1 call GET "/db/shop/@amqp-tasks/$id"
        state="$(json 'd.get("state")')"
        [ "$state" = "$want" ] && return 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "run.sh: task $id is still $state after ${wait_s}s (wanted: $want)"
            return 1
        fi
        sleep 0.2
    done
}


# -- configuration: the application's and the worker's --------------------------

"$py" - "$workdir" "$AMQP_URL" "$REDIS_URL" "$STATE_PREFIX" "$APP" "$ROOT_PASSWORD" \
        "$SERVICE_TOKEN" "$QUEUE" <<'PY'
import json, os, sys
workdir, amqp_url, redis_url, prefix, app, password, token, queue = sys.argv[1:]
guillotina = {
    "applications": ["quebert.bridge.guillotina", "examples.guillotina_app.shop_app"],
    "databases": {"db": {"storage": "DUMMY_FILE",
                         "filename": os.path.join(workdir, "db.pickle")}},
    "root_user": {"password": password},
    "jwt": {"secret": os.urandom(24).hex(), "algorithm": "HS256"},
    "quebert": {"amqp_url": amqp_url, "redis_url": redis_url, "state_prefix": prefix,
                "queue": queue, "callback_url": app, "service_token": token},
}
worker = {
    "queues": {queue: {"concurrency": 10, "max_attempts": 3, "min_backoff": 1}},
    "state": {"backend": "redis", "url": redis_url, "prefix": prefix, "ttl": 3600},
    "dispatch": {"credentials": [{"url_prefix": app + "/db/",
                                  "token_env": "SHOP_SERVICE_TOKEN"}]},
    "shutdown_timeout": 5,
}
for name, data in (("guillotina.json", guillotina), ("worker.json", worker)):
    with open(os.path.join(workdir, name), "w") as f:
        json.dump(data, f, indent=2)
PY

# -- start the application and the worker --------------------------------------------

cd "$root"
say "starting the shop application on $APP"
echo "$ guillotina serve -c guillotina.json --host 127.0.0.1 --port $GUILLOTINA_PORT"
(cd "$workdir" && exec env PYTHONPATH="$root" "$guillotina" serve -c "$workdir/guillotina.json" \
    --host 127.0.0.1 --port "$GUILLOTINA_PORT" </dev/null >"$app_log" 2>&1) &
app_pid=$!

say "starting a worker with the shop's tasks and the service token"
echo "$ SHOP_SERVICE_TOKEN=\$TOKEN twistd -n amqp-worker --config worker.json \\"
echo "      --tasks examples.guillotina_app.shop_tasks --amqp-url ..."
env SHOP_SERVICE_TOKEN="$SERVICE_TOKEN" PYTHONPATH="$root" "$twistd" --pidfile= -n \
    --logfile="$worker_log" amqp-worker --config "$workdir/worker.json" \
    --tasks examples.guillotina_app.shop_tasks --amqp-url "$AMQP_URL" \
    </dev/null >>"$worker_log" 2>&1 &
worker_pid=$!

deadline=$((SECONDS + 90))
until port_busy "$GUILLOTINA_PORT" && grep -q "consuming $QUEUE" "$worker_log" 2>/dev/null; do
    kill -0 "$worker_pid" 2>/dev/null || { worker_pid=""; die "the worker exited while starting"; }
    kill -0 "$app_pid" 2>/dev/null || { app_pid=""; die "the application exited while starting"; }
    [ "$SECONDS" -lt "$deadline" ] || die "not ready after 90 s"
    sleep 0.3
done
echo "the application listens and the worker consumes $QUEUE"

say "1. a container"
call POST /db '{"@type": "Container", "id": "shop"}'
check container "the container is created" "$code" 200

say "2. an order: a call task and a URL task calling back into the application"
call POST /db/shop/@orders '{"order_id": "A-17", "email": "ada@example.com"}'
check order "the order is accepted" "$code" 200
receipt="$(json 'd["receipt_task"]')"
shipping="$(json 'd["shipping_task"]')"
case "$receipt" in task:db-shop-*) ok=yes ;; *) ok=no ;; esac
check task-id "task ids have guillotina_amqp's form task:{db}-{container}-{uuid}" "$ok" yes

wait_state "$receipt" 30 succeeded || true
call GET "/db/shop/@amqp-tasks/$receipt"
check receipt "the receipt task succeeded" "$(json 'd["state"]')" succeeded
check receipt-context "the task got the container and user as plain data" \
    "$(json 'd["result"]["container"] + "/" + d["result"]["ordered_by"]')" shop/root

wait_state "$shipping" 30 succeeded || true
call GET "/db/shop/@amqp-tasks/$shipping"
check shipping "the callback task succeeded" "$(json 'd["state"]')" succeeded
check callback-user "the callback ran as the service principal" \
    "$(json 'json.loads(d["result"]["body"])["called_by"]' 2>/dev/null || echo '?')" quebert-service

say "3. a report scheduled in 60 s, cancelled"
call POST /db/shop/@reports '{"month": "2026-11", "countdown": 60}'
report="$(json 'd["report_task"]')"
call DELETE "/db/shop/@amqp-tasks/$report"
check cancel "DELETE answers 200" "$code" 200
wait_state "$report" 10 canceled || true
QUIET=1 call GET "/db/shop/@amqp-tasks/$report"
check canceled "the report ended canceled" "$(json 'd["state"]')" canceled

say "4. the container's tasks, newest first"
call GET /db/shop/@amqp-tasks
check list "three tasks are listed" "$(json 'len(d)')" 3

say "5. permissions and unknown tasks"
AUTH=none call GET /db/shop/@amqp-tasks
check anonymous "an anonymous caller is refused" "$code" 401
AUTH=none call POST /db/shop/@order-shipped '{"order_id": "forged"}'
check forged "only the workers may call the callback" "$code" 401
call GET /db/shop/@amqp-tasks/task:db-shop-0123
check unknown "an unknown id is not found" "$code:$(json 'd["reason"]')" "404:Task not found"

say "6. a task published by an unmodified guillotina_amqp producer"
echo "$ python examples/guillotina_app/legacy_producer.py \$AMQP_URL quebert $QUEUE"
legacy="$("$py" "$here/legacy_producer.py" "$AMQP_URL" quebert "$QUEUE")"
echo "$legacy"
state=""
for _ in $(seq 1 100); do
    out="$("$venv/bin/quebert" status "$legacy" --redis-url "$REDIS_URL" \
           --prefix "$STATE_PREFIX" 2>/dev/null || true)"
    body="${out:-{\}}"
    state="$(json 'd.get("state")')"
    [ "$state" = succeeded ] && break
    sleep 0.2
done
echo "$ quebert status $legacy --prefix $STATE_PREFIX"
show
check legacy "the legacy message ran (func resolved through an alias)" "$state" succeeded

say "7. no credentials in RabbitMQ or Redis"
caller_auth="$(cd "$here" && "$py" -c 'import legacy_producer as p; print(p.CALLER_AUTHORIZATION)')"
root_basic="$(printf 'root:%s' "$ROOT_PASSWORD" | base64)"
leaks="$("$py" "$here/find_secrets.py" "$AMQP_URL" "$REDIS_URL" "$STATE_PREFIX" "$QUEUE" \
         "$ROOT_PASSWORD" "$root_basic" "$SERVICE_TOKEN" "$caller_auth" || true)"
echo "$leaks"
check secrets "no password, token or Authorization value stored" "${leaks##*$'\n'}" "0 found"

say "summary"
if [ "$failures" -eq 0 ]; then
    echo "ALL CHECKS PASSED"
else
    echo "$failures CHECK(S) FAILED"
    exit 1
fi
