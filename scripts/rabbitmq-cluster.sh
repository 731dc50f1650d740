#!/usr/bin/env bash
# A throwaway 3-node RabbitMQ cluster on loopback, beside the main node.
#
#     bash scripts/rabbitmq-cluster.sh start          # 3 nodes, clustered
#     bash scripts/rabbitmq-cluster.sh status         # exit 0 iff all 3 up and clustered
#     bash scripts/rabbitmq-cluster.sh urls           # amqp://...:5681/,...:5682/,...:5683/
#     bash scripts/rabbitmq-cluster.sh leader QUEUE [VHOST]
#     bash scripts/rabbitmq-cluster.sh kill c2        # kill -9: a real node loss
#     bash scripts/rabbitmq-cluster.sh restart-node c2
#     bash scripts/rabbitmq-cluster.sh stop-node c2 [--app]
#     bash scripts/rabbitmq-cluster.sh stop           # everything gone
#     bash scripts/rabbitmq-cluster.sh stop-unused    # stop, unless a test process
#                                                     # uses it or QUEBERT_CLUSTER_KEEP=1
#
# The nodes are quebert-c1@localhost .. quebert-c3@localhost, AMQP on
# 127.0.0.1:5681-5683 (guest/guest allowed over loopback), Erlang
# distribution on 25681-25683.  Each has its own config file, data, log and
# pid file under $QUEBERT_CLUSTER_DIR (default /tmp/quebert-rabbit-cluster),
# owned by the rabbitmq user, so the main node rabbit@localhost on 5672
# (configured by /etc/rabbitmq) is never touched: every rabbitmqctl call
# here names its node with -n.
#
# NODE arguments may be written c2, 2, quebert-c2 or quebert-c2@localhost.
#
# Environment:
#   QUEBERT_CLUSTER_DIR        base directory (removed by `stop`)
#   QUEBERT_CLUSTER_PORT_BASE  AMQP port of node N is BASE+N (default 5680)
#   QUEBERT_CLUSTER_DIST_BASE  distribution port of node N is BASE+N (default 25680)
#   QUEBERT_CLUSTER_TIMEOUT    seconds any one wait may take (default 120)
#   QUEBERT_CLUSTER_KEEP=1     stop-unused (and tests/_cluster.py at exit) leave it up
#
# Runs as root (rabbitmq-server and rabbitmqctl drop to the rabbitmq user,
# whose HOME /var/lib/rabbitmq holds the Erlang cookie the main node uses
# too) or as the rabbitmq user.  Never reads stdin.
set -euo pipefail

base="${QUEBERT_CLUSTER_DIR:-/tmp/quebert-rabbit-cluster}"
port_base="${QUEBERT_CLUSTER_PORT_BASE:-5680}"
dist_base="${QUEBERT_CLUSTER_DIST_BASE:-25680}"
wait_timeout="${QUEBERT_CLUSTER_TIMEOUT:-120}"
nodes=(1 2 3)
prog="rabbitmq-cluster.sh"

say() { echo "$prog: $*"; }
die() { echo "$prog: error: $*" >&2; exit 1; }

node_name() { echo "quebert-c$1@localhost"; }
node_dir() { echo "$base/c$1"; }
pid_file() { echo "$base/c$1/rabbitmq.pid"; }
amqp_port() { echo $((port_base + $1)); }
dist_port() { echo $((dist_base + $1)); }
amqp_url() { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/"; }

# node_index NODE: 1..3 from c2, 2, quebert-c2 or quebert-c2@localhost.
node_index() {
    local n="${1:-}"
    n="${n%@localhost}"
    n="${n#quebert-}"
    n="${n#c}"
    case "$n" in
        1|2|3) echo "$n" ;;
        *) die "unknown node '${1:-}' (expected c1, c2 or c3)" ;;
    esac
}

check_installed() {
    command -v rabbitmq-server >/dev/null 2>&1 \
        || die "rabbitmq-server is not installed (bash scripts/bootstrap.sh installs it)"
    command -v rabbitmqctl >/dev/null 2>&1 || die "rabbitmqctl is not installed"
    id rabbitmq >/dev/null 2>&1 || die "there is no rabbitmq user"
    local uid
    uid="$(id -u)"
    if [ "$uid" != 0 ] && [ "$uid" != "$(id -u rabbitmq)" ]; then
        die "run as root or as the rabbitmq user (the nodes run as rabbitmq)"
    fi
    # rabbitmq-server and rabbitmqctl (run as root, they su to rabbitmq) use
    # the cookie in rabbitmq's home, like the main node.
    if [ "$uid" = 0 ] && [ ! -f /var/lib/rabbitmq/.erlang.cookie ]; then
        die "/var/lib/rabbitmq/.erlang.cookie is missing (start the main RabbitMQ once)"
    fi
}

# ctl N ARGS...: rabbitmqctl on node N, bounded.
ctl() {
    local i="$1"
    shift
    timeout --kill-after=10 "$wait_timeout" \
        rabbitmqctl -q -n "$(node_name "$i")" "$@" </dev/null
}

# quiet_ctl N ARGS...: ctl, its output shown only if it fails (then die).
quiet_ctl() {
    local i="$1" out
    shift
    out="$(ctl "$i" "$@" 2>&1)" || { echo "$out" >&2; die "rabbitmqctl -n $(node_name "$i") $* failed"; }
}

# beam_pid N: the pid of node N's Erlang VM if it runs, else nothing (status 1).
beam_pid() {
    local pid
    pid="$(cat "$(pid_file "$1")" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/environ" ] \
        && tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" \
            | grep -x "RABBITMQ_NODENAME=$(node_name "$1")" >/dev/null; then
        echo "$pid"
        return 0
    fi
    # No (valid) pid file: look for a VM started with this node's name.
    local strays
    strays="$(stray_pids "$1")"
    [ -n "$strays" ] || return 1
    echo "${strays%%$'\n'*}"
}

# stray_pids N: beam.smp processes whose environment names node N.
stray_pids() {
    local proc pid
    for proc in /proc/[0-9]*; do
        pid="${proc#/proc/}"
        [ "$(cat "$proc/comm" 2>/dev/null || true)" = beam.smp ] || continue
        if tr '\0' '\n' 2>/dev/null <"$proc/environ" \
            | grep -x "RABBITMQ_NODENAME=$(node_name "$1")" >/dev/null; then
            echo "$pid"
        fi
    done
}

vm_up() { beam_pid "$1" >/dev/null; }

# app_running N: the VM runs and the rabbit application is up.
app_running() {
    vm_up "$1" && ctl "$1" eval 'rabbit:is_running().' 2>/dev/null | grep -x true >/dev/null
}

# running_nodes N: the cluster's running nodes as node N sees them, one a line.
running_nodes() {
    ctl "$1" eval \
        'io:format("~s~n", [string:join([atom_to_list(X) || X <- rabbit_nodes:all_running()], " ")]).' \
        2>/dev/null | head -n 1 | tr ' ' '\n' | grep . || true
}

# clustered: every node runs and node 1..3 all see the three of them.
clustered() {
    local i seen
    for i in "${nodes[@]}"; do
        app_running "$i" || return 1
    done
    for i in "${nodes[@]}"; do
        seen="$(running_nodes "$i" | sort | tr '\n' ' ')"
        [ "$seen" = "$(for j in "${nodes[@]}"; do node_name "$j"; done | sort | tr '\n' ' ')" ] \
            || return 1
    done
}

# prepare N: directories and config of node N (kept if they exist).
prepare() {
    local dir
    dir="$(node_dir "$1")"
    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/rabbitmq.conf" <<EOF
# quebert test cluster node $(node_name "$1") (scripts/rabbitmq-cluster.sh)
listeners.tcp.local = 127.0.0.1:$(amqp_port "$1")
loopback_users = none
EOF
    echo '[].' >"$dir/enabled_plugins"
    advanced "$1"
    chown -R rabbitmq:rabbitmq "$dir"
}

# advanced N: node N's advanced.config.  RabbitMQ 3.10's dead-letter worker
# keeps sending to a quorum queue's dead leader until this timeout (2 min by
# default) after the node is back: delayed tasks wait that long
# (docs/scaling.rst, "Delayed tasks while a node is down").
advanced() {
    echo '[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].' \
        >"$(node_dir "$1")/advanced.config"
}

# launch N: start node N's VM detached (does not wait).
launch() {
    local i="$1" dir
    dir="$(node_dir "$i")"
    [ -f "$dir/rabbitmq.conf" ] || prepare "$i"
    if [ ! -f "$dir/advanced.config" ]; then
        advanced "$i"
        chown rabbitmq:rabbitmq "$dir/advanced.config"
    fi
    rm -f "$(pid_file "$i")"
    # rabbitmq-env.conf's NODENAME is overridden by RABBITMQ_NODENAME, and
    # /etc/rabbitmq/rabbitmq.conf (port 5672) by RABBITMQ_CONFIG_FILE.  The
    # VM must not inherit the lock's descriptor (9): it would hold it forever.
    env RABBITMQ_NODENAME="$(node_name "$i")" \
        RABBITMQ_NODE_PORT="$(amqp_port "$i")" \
        RABBITMQ_DIST_PORT="$(dist_port "$i")" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_PID_FILE="$(pid_file "$i")" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_ALLOW_INPUT=false \
        timeout --kill-after=10 "$wait_timeout" rabbitmq-server -detached </dev/null 9>&- \
        >>"$dir/log/detached.out" 2>&1 \
        || die "rabbitmq-server -detached failed for $(node_name "$i"); see $dir/log/"
}

# await N: wait until node N's rabbit application runs.
await() {
    local i="$1" out
    if ! out="$(ctl "$i" wait "$(pid_file "$i")" --timeout "$wait_timeout" 2>&1)"; then
        echo "$out" >&2
        tail -n 30 "$(node_dir "$i")/log/$(node_name "$i").log" >&2 2>/dev/null || true
        die "$(node_name "$i") did not start within ${wait_timeout}s; logs in $(node_dir "$i")/log/"
    fi
}

# await_member N: wait until the other running nodes see node N running.
await_member() {
    local i="$1" j deadline=$((SECONDS + wait_timeout))
    while :; do
        local ok=1
        for j in "${nodes[@]}"; do
            app_running "$j" || continue
            running_nodes "$j" | grep -x "$(node_name "$i")" >/dev/null || ok=0
        done
        [ "$ok" = 1 ] && return 0
        [ "$SECONDS" -lt "$deadline" ] \
            || die "$(node_name "$i") did not rejoin the cluster within ${wait_timeout}s"
        sleep 1
    done
}

# revive: start the VMs that are down and the rabbit apps that are stopped.
revive() {
    local i down=()
    for i in "${nodes[@]}"; do
        vm_up "$i" || { launch "$i"; down+=("$i"); }
    done
    for i in "${down[@]}"; do await "$i"; done
    for i in "${nodes[@]}"; do
        app_running "$i" || ctl "$i" start_app >/dev/null || return 1
    done
}

cmd_start() {
    check_installed
    local started=$SECONDS i
    if clustered; then
        say "already up and clustered: $(cmd_urls)"
        return 0
    fi
    if [ -f "$base/clustered" ]; then
        # Formed before: start the nodes that are down (they rejoin on their own).
        say "cluster formed before; starting the nodes that are down"
        # In a subshell: a failure (die) falls through to a fresh start.
        if (revive) && clustered; then
            say "up and clustered in $((SECONDS - started))s: $(cmd_urls)"
            return 0
        fi
        say "could not bring the old cluster back; starting afresh"
    fi
    cmd_stop >/dev/null
    mkdir -p "$base"
    chmod 755 "$base"
    for i in "${nodes[@]}"; do
        if ss -ltn 2>/dev/null | grep -E "127\.0\.0\.1:($(amqp_port "$i")|$(dist_port "$i"))\b" >/dev/null; then
            die "port $(amqp_port "$i") or $(dist_port "$i") is already in use"
        fi
        prepare "$i"
        launch "$i"
    done
    for i in "${nodes[@]}"; do await "$i"; done
    say "3 nodes up after $((SECONDS - started))s; joining them"
    for i in "${nodes[@]:1}"; do
        quiet_ctl "$i" stop_app
        quiet_ctl "$i" join_cluster "$(node_name 1)"
        quiet_ctl "$i" start_app
        quiet_ctl "$i" await_startup --timeout "$wait_timeout"
    done
    local deadline=$((SECONDS + wait_timeout))
    until clustered; do
        [ "$SECONDS" -lt "$deadline" ] || die "the nodes did not form one cluster within ${wait_timeout}s"
        sleep 1
    done
    touch "$base/clustered"
    say "up and clustered in $((SECONDS - started))s: $(cmd_urls)"
}

cmd_stop() {
    local i pid
    if [ -d "$base" ] && command -v rabbitmqctl >/dev/null 2>&1; then
        # Graceful stops in parallel (a stopping node waits for no peer).
        local waits=()
        for i in "${nodes[@]}"; do
            if vm_up "$i"; then
                ( ctl "$i" stop "$(pid_file "$i")" >/dev/null 2>&1 || true ) &
                waits+=("$!")
            fi
        done
        for pid in "${waits[@]}"; do wait "$pid" || true; done
    fi
    # Leftovers (a stop that failed, a node without pid file): kill -9.
    for i in "${nodes[@]}"; do
        while pid="$(beam_pid "$i")"; do
            say "killing leftover $(node_name "$i") (pid $pid)"
            kill -9 "$pid" 2>/dev/null || true
            wait_gone "$pid" 10 || die "pid $pid of $(node_name "$i") survived kill -9"
        done
    done
    rm -rf "$base"
    say "stopped; $base removed"
}

# wait_gone PID SECONDS
wait_gone() {
    local deadline=$((SECONDS + $2))
    while kill -0 "$1" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# stop-unused: `stop`, unless there is nothing to stop, QUEBERT_CLUSTER_KEEP=1,
# or a test process (tests/_cluster.py holds a shared lock on $base.users)
# still uses the cluster.  For the end of a test run.
cmd_stop_unused() {
    if [ ! -d "$base" ]; then
        return 0
    fi
    if [ "${QUEBERT_CLUSTER_KEEP:-}" = 1 ]; then
        say "QUEBERT_CLUSTER_KEEP=1: left running"
        return 0
    fi
    exec 8>"$base.users"
    if ! flock -n -x 8; then
        say "a test process still uses the cluster: left running"
        return 0
    fi
    lock
    cmd_stop
}

cmd_status() {
    local i pid state all=0
    for i in "${nodes[@]}"; do
        if pid="$(beam_pid "$i")"; then
            if app_running "$i"; then state="running"; else state="vm up, app stopped"; all=1; fi
        else
            pid="-"; state="down"; all=1
        fi
        printf '%-22s amqp %-5s dist %-5s pid %-7s %s\n' "$(node_name "$i")" \
            "$(amqp_port "$i")" "$(dist_port "$i")" "$pid" "$state"
    done
    for i in "${nodes[@]}"; do
        if app_running "$i"; then
            echo "running nodes seen by $(node_name "$i"): $(running_nodes "$i" | tr '\n' ' ')"
            break
        fi
    done
    if [ "$all" = 0 ] && clustered; then
        echo "cluster: up, 3 nodes"
        return 0
    fi
    echo "cluster: not (fully) up"
    return 3
}

cmd_urls() {
    local i urls=()
    for i in "${nodes[@]}"; do urls+=("$(amqp_url "$i")"); done
    (IFS=,; echo "${urls[*]}")
}

cmd_kill() {
    local i pid
    i="$(node_index "${1:-}")"
    pid="$(beam_pid "$i")" || die "$(node_name "$i") is not running"
    kill -9 "$pid"
    wait_gone "$pid" 10 || die "pid $pid of $(node_name "$i") survived kill -9"
    say "killed $(node_name "$i") (pid $pid)"
}

cmd_restart_node() {
    check_installed
    local i
    i="$(node_index "${1:-}")"
    [ -f "$base/clustered" ] || die "no cluster under $base (run: $prog start)"
    if ! vm_up "$i"; then
        launch "$i"
        await "$i"
    elif ! app_running "$i"; then
        ctl "$i" start_app >/dev/null
        ctl "$i" await_startup --timeout "$wait_timeout" >/dev/null
    else
        say "$(node_name "$i") is already running"
    fi
    await_member "$i"
    say "$(node_name "$i") is back in the cluster"
}

cmd_stop_node() {
    local i
    i="$(node_index "${1:-}")"
    vm_up "$i" || die "$(node_name "$i") is not running"
    if [ "${2:-}" = --app ]; then
        ctl "$i" stop_app >/dev/null
        say "stopped the rabbit application of $(node_name "$i") (VM still up)"
    else
        ctl "$i" stop "$(pid_file "$i")" >/dev/null
        say "stopped $(node_name "$i")"
    fi
}

cmd_leader() {
    local queue="${1:-}" vhost="${2:-/}" i out leader
    [ -n "$queue" ] || die "usage: $prog leader QUEUE [VHOST]"
    for i in "${nodes[@]}"; do
        app_running "$i" || continue
        out="$(ctl "$i" list_queues -p "$vhost" --no-table-headers name leader)" || continue
        leader="$(awk -F'\t' -v q="$queue" '$1 == q { print $2 }' <<<"$out")"
        [ -n "$leader" ] || die "no queue '$queue' in vhost '$vhost' (or it has no leader)"
        echo "$leader"
        return 0
    done
    die "no node of the cluster is running"
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

# lock: one start, stop or restart-node at a time (several test processes
# may share the cluster).  The lock file is beside the base directory,
# which `stop` removes.
lock() {
    exec 9>"$base.lock"
    flock -w "$wait_timeout" 9 || die "another $prog holds $base.lock for ${wait_timeout}s"
}

case "${1:-}" in
    start) lock; cmd_start ;;
    stop) lock; cmd_stop ;;
    stop-unused) cmd_stop_unused ;;
    status) cmd_status ;;
    urls) cmd_urls ;;
    kill) cmd_kill "${2:-}" ;;
    restart-node) lock; cmd_restart_node "${2:-}" ;;
    stop-node) cmd_stop_node "${2:-}" "${3:-}" ;;
    leader) shift; cmd_leader "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
