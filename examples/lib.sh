# Shell helpers shared by the examples' run.sh scripts; source it after
# setting $py (the virtualenv's python).  Nothing here starts anything.

say() { printf '\n== %s\n' "$*"; }
die() { printf 'run.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# port_busy PORT: true when something accepts connections on 127.0.0.1:PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# stop_pid PID SECONDS: SIGTERM, then SIGKILL after SECONDS.
stop_pid() {
    local pid=$1 wait_s=$2 i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 $((wait_s * 5))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "run.sh: pid $pid still running after ${wait_s}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# json EXPR: evaluate a Python expression on the JSON in $body (as `d`).
json() {
    "$py" -c 'import json, sys; d = json.loads(sys.argv[1]); print(eval(sys.argv[2]))' \
        "$body" "$1"
}

# show: print $body, indented JSON (or as it is).
show() {
    "$py" -c '
import json, sys
try:
    print(json.dumps(json.loads(sys.argv[1]), indent=2, sort_keys=True))
except ValueError:
    print(sys.argv[1])' "$body" | sed 's/^/    /'
}

# check LABEL TEXT ACTUAL EXPECTED: print one RESULT line; counts $failures.
failures=0
check() {
    if [ "$3" = "$4" ]; then
        echo "RESULT $1: $2 (ok)"
    else
        echo "RESULT $1: $2 (FAILED: got $3, expected $4)"
        failures=$((failures + 1))
    fi
}
