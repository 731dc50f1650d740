#!/usr/bin/env bash
# A throwaway Redis Sentinel set on 127.0.0.1, for the failover tests and for
# trying quebert with a Redis that survives its primary:
#
#     bash scripts/redis-sentinel.sh start          # primary, replica, 3 sentinels
#     bash scripts/redis-sentinel.sh url            # redis+sentinel://... for --redis-url
#     bash scripts/redis-sentinel.sh status
#     bash scripts/redis-sentinel.sh kill-primary [--wait]   # kill -9 the current primary
#     bash scripts/redis-sentinel.sh restart NAME   # data1, data2, sentinel1..3
#     bash scripts/redis-sentinel.sh stop           # everything, and the directory
#
# Two data nodes (data1 starts as the primary, data2 as its replica) and
# three sentinels monitoring them as service "$QUEBERT_SENTINEL_SERVICE"
# (quorum 2, down after 1 s, failover timeout 3 s).  Nothing is saved to
# disk (--save "" --appendonly no); every file (configs, pid files, logs) is
# under $QUEBERT_SENTINEL_DIR (default /tmp/quebert-redis-sentinel).
#
# Environment: QUEBERT_SENTINEL_DIR, QUEBERT_SENTINEL_SERVICE (qm),
# QUEBERT_SENTINEL_DATA_PORTS ("6380 6381"), QUEBERT_SENTINEL_PORTS
# ("26380 26381 26382").  Port 6379, the main Redis, is refused: this script
# never touches it.
#
# `start` is idempotent (it starts what is not running, and a data node
# restarted after a failover comes back as a replica of the current
# primary); `stop` works in any state: it stops what the pid files name,
# kills -9 whatever still listens on the set's ports *from this directory*
# (a process's working directory is its node's directory), and removes the
# directory.  `kill-primary --wait` prints how long the sentinels took to
# promote the replica.
set -euo pipefail

DIR="${QUEBERT_SENTINEL_DIR:-/tmp/quebert-redis-sentinel}"
SERVICE="${QUEBERT_SENTINEL_SERVICE:-qm}"
read -r -a DATA_PORTS <<< "${QUEBERT_SENTINEL_DATA_PORTS:-6380 6381}"
read -r -a SENTINEL_PORTS <<< "${QUEBERT_SENTINEL_PORTS:-26380 26381 26382}"
HOST=127.0.0.1
REDIS_SERVER="${REDIS_SERVER:-redis-server}"
REDIS_CLI="${REDIS_CLI:-redis-cli}"

die() { echo "redis-sentinel.sh: $*" >&2; exit 1; }

[ "${#DATA_PORTS[@]}" -eq 2 ] || die "QUEBERT_SENTINEL_DATA_PORTS must name 2 ports"
[ "${#SENTINEL_PORTS[@]}" -eq 3 ] || die "QUEBERT_SENTINEL_PORTS must name 3 ports"
for p in "${DATA_PORTS[@]}" "${SENTINEL_PORTS[@]}"; do
    [ "$p" != 6379 ] || die "port 6379 is the main Redis; pick other ports"
done
case "$DIR" in
    /|"") die "QUEBERT_SENTINEL_DIR must be a directory of its own" ;;
esac

NAMES=(data1 data2 sentinel1 sentinel2 sentinel3)

port_of() {
    case "$1" in
        data1) echo "${DATA_PORTS[0]}" ;;
        data2) echo "${DATA_PORTS[1]}" ;;
        sentinel1) echo "${SENTINEL_PORTS[0]}" ;;
        sentinel2) echo "${SENTINEL_PORTS[1]}" ;;
        sentinel3) echo "${SENTINEL_PORTS[2]}" ;;
        *) die "unknown node $1 (one of: ${NAMES[*]})" ;;
    esac
}

name_of_port() {
    local n
    for n in "${NAMES[@]}"; do
        if [ "$(port_of "$n")" = "$1" ]; then echo "$n"; return 0; fi
    done
    return 1
}

cli() { timeout 3 "$REDIS_CLI" -h "$HOST" -p "$1" "${@:2}" 2>/dev/null; }

alive() {  # alive NAME: its pid file names a live process that answers PING
    local pidfile="$DIR/$1/redis.pid"
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null \
        && [ "$(cli "$(port_of "$1")" ping)" = PONG ]
}

# The current primary as "host port": asked of the sentinels, else read from
# a sentinel's config file (sentinels rewrite it after a failover), else data1.
primary() {
    local p out
    for p in "${SENTINEL_PORTS[@]}"; do
        out="$(cli "$p" sentinel get-master-addr-by-name "$SERVICE" | paste -sd' ')"
        if [ -n "${out// /}" ]; then echo "$out"; return 0; fi
    done
    for p in 1 2 3; do
        if [ -f "$DIR/sentinel$p/sentinel.conf" ]; then
            out="$(awk -v s="$SERVICE" '$1=="sentinel" && $2=="monitor" && $3==s {print $4, $5}' \
                   "$DIR/sentinel$p/sentinel.conf")"
            if [ -n "$out" ]; then echo "$out"; return 0; fi
        fi
    done
    echo "$HOST ${DATA_PORTS[0]}"
}

wait_ping() {  # wait_ping PORT: up to 10 s
    local i
    for i in $(seq 100); do
        [ "$(cli "$1" ping)" = PONG ] && return 0
        sleep 0.1
    done
    return 1
}

start_data() {  # start_data NAME
    local name="$1" port node
    port="$(port_of "$name")"
    node="$DIR/$name"
    alive "$name" && return 0
    mkdir -p "$node"
    read -r phost pport <<< "$(primary)"
    {
        echo "bind $HOST"
        echo "port $port"
        echo "dir $node"
        echo "daemonize yes"
        echo "pidfile $node/redis.pid"
        echo "logfile $node/redis.log"
        echo 'save ""'
        echo "appendonly no"
        # a (re)started replica syncs at once, without a snapshot on disk
        echo "repl-diskless-sync yes"
        echo "repl-diskless-sync-delay 0"
        if [ "$pport" != "$port" ]; then echo "replicaof $phost $pport"; fi
    } > "$node/redis.conf"
    "$REDIS_SERVER" "$node/redis.conf" >/dev/null
    wait_ping "$port" || die "$name did not start (see $node/redis.log)"
}

start_sentinel() {  # start_sentinel NAME
    local name="$1" port node
    port="$(port_of "$name")"
    node="$DIR/$name"
    alive "$name" && return 0
    mkdir -p "$node"
    if [ ! -f "$node/sentinel.conf" ]; then
        # kept across restarts: a sentinel rewrites it with what it learnt
        {
            echo "bind $HOST"
            echo "port $port"
            echo "dir $node"
            echo "daemonize yes"
            echo "pidfile $node/redis.pid"
            echo "logfile $node/redis.log"
            echo "sentinel monitor $SERVICE $HOST ${DATA_PORTS[0]} 2"
            echo "sentinel down-after-milliseconds $SERVICE 1000"
            echo "sentinel failover-timeout $SERVICE 3000"
            echo "sentinel parallel-syncs $SERVICE 1"
        } > "$node/sentinel.conf"
    fi
    "$REDIS_SERVER" "$node/sentinel.conf" --sentinel >/dev/null
    wait_ping "$port" || die "$name did not start (see $node/redis.log)"
}

start_node() {
    case "$1" in
        data*) start_data "$1" ;;
        sentinel*) start_sentinel "$1" ;;
    esac
}

cmd_start() {
    command -v "$REDIS_SERVER" >/dev/null || die "$REDIS_SERVER is not installed"
    mkdir -p "$DIR"
    local n
    # the data nodes first, so that data2 replicates data1 on a fresh start
    for n in "${NAMES[@]}"; do start_node "$n"; done
    # wait until the sentinels agree on a primary that has a replica
    local i p
    for i in $(seq 100); do
        p="$(primary)"
        if [ "$(cli "${p#* }" info replication | tr -d '\r' | awk -F: '$1=="connected_slaves"{print $2}')" = 1 ] \
           && [ -n "$(cli "${SENTINEL_PORTS[0]}" sentinel get-master-addr-by-name "$SERVICE")" ]; then
            echo "started in $DIR: primary $p, $(cmd_url)"
            return 0
        fi
        sleep 0.1
    done
    die "the set did not settle (see $DIR/*/redis.log)"
}

# Pids that listen on PORT and run from this set's directory.
our_listeners() {
    local pid cwd
    for pid in $(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
        cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null || true)"
        case "$cwd" in
            "$DIR"/*) echo "$pid" ;;
        esac
    done
}

stop_node() {  # stop_node NAME: SIGTERM, then -9 after 3 s; also strays on its port
    local name="$1" port pid pids=() i
    port="$(port_of "$name")"
    if [ -f "$DIR/$name/redis.pid" ]; then
        pid="$(cat "$DIR/$name/redis.pid")"
        # only a redis process: the pid may have been reused
        if [ -n "$pid" ] && grep -qa redis "/proc/$pid/cmdline" 2>/dev/null; then
            pids+=("$pid")
        fi
    fi
    for pid in $(our_listeners "$port"); do pids+=("$pid"); done
    [ "${#pids[@]}" -gt 0 ] || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for i in $(seq 30); do
        kill -0 "${pids[@]}" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
    rm -f "$DIR/$name/redis.pid"
}

cmd_stop() {
    local n
    for n in "${NAMES[@]}"; do stop_node "$n"; done
    rm -rf "$DIR"
    echo "stopped; removed $DIR"
}

cmd_status() {
    local n port role
    echo "primary (sentinels): $(primary)"
    for n in "${NAMES[@]}"; do
        port="$(port_of "$n")"
        if alive "$n"; then
            case "$n" in
                data*) role="$(cli "$port" role | head -1)" ;;
                *) role=sentinel ;;
            esac
            echo "$n $HOST:$port up ($role, pid $(cat "$DIR/$n/redis.pid"))"
        else
            echo "$n $HOST:$port down"
        fi
    done
}

cmd_url() {
    local hosts=() p
    for p in "${SENTINEL_PORTS[@]}"; do hosts+=("$HOST:$p"); done
    local IFS=,
    echo "redis+sentinel://${hosts[*]}/$SERVICE/0"
}

cmd_kill_primary() {
    local wait="${1:-}" host port name pid start now new
    read -r host port <<< "$(primary)"
    name="$(name_of_port "$port")" || die "the primary $host:$port is not one of this set's nodes"
    pid="$(cli "$port" info server | tr -d '\r' | awk -F: '$1=="process_id"{print $2}')"
    [ -n "$pid" ] || die "$name ($host:$port) does not answer"
    start="$(date +%s.%N)"
    kill -9 "$pid"
    rm -f "$DIR/$name/redis.pid"
    echo "killed $name ($host:$port, pid $pid)"
    if [ "$wait" = --wait ]; then
        for i in $(seq 300); do
            new="$(primary)"
            if [ "${new#* }" != "$port" ] && [ "$(cli "${new#* }" role | head -1)" = master ]; then
                now="$(date +%s.%N)"
                echo "promoted $(name_of_port "${new#* }") ($new) after $(awk -v a="$start" -v b="$now" 'BEGIN{printf "%.1f", b - a}') s"
                return 0
            fi
            sleep 0.1
        done
        die "no promotion within 30 s"
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) cmd_url ;;
    kill-primary) cmd_kill_primary "${2:-}" ;;
    restart)
        [ -n "${2:-}" ] || die "restart NAME (one of: ${NAMES[*]})"
        port_of "$2" >/dev/null
        stop_node "$2"
        start_node "$2"
        echo "restarted $2"
        ;;
    *) die "usage: $0 start|stop|status|url|kill-primary [--wait]|restart NAME" ;;
esac
