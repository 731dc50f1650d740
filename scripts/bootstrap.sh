#!/usr/bin/env bash
# Make this checkout ready to run: a .venv with quebert installed (editable,
# compat mode so that `twistd amqp-worker` finds the plugin), plus Redis and
# RabbitMQ installed and running on this machine.
#
#     bash scripts/bootstrap.sh          # or: source scripts/bootstrap.sh
#
# Idempotent: a second run only checks.  Needs root (or sudo) the first time
# on a fresh Debian, to apt-get what is missing.  Works without a terminal
# (CI=true, stdin closed).
#
# Environment:
#   PYTHON              interpreter for the venv [python3] (>= 3.10)
#   QUEBERT_REDIS_PORT  Redis port on 127.0.0.1 [6379]
#   QUEBERT_AMQP_PORT   RabbitMQ AMQP port on 127.0.0.1 [5672]
#   RABBITMQ_WAIT       seconds to wait for RabbitMQ to boot [90]
#   QUEBERT_SKIP_SERVICES=1  only set up the venv
#   QUEBERT_SKIP_BROWSER=1   do not install Chromium (the console's browser tests need it)

_quebert_bootstrap() {
    set -euo pipefail

    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cd "$root"

    # rabbitmq-server and friends live in /usr/sbin, not always on a user's PATH.
    case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac

    local python="${PYTHON:-python3}"
    local venv="$root/.venv"
    local stamp="$venv/.quebert-install-stamp"
    local redis_port="${QUEBERT_REDIS_PORT:-6379}"
    local amqp_port="${QUEBERT_AMQP_PORT:-5672}"
    local apt_updated=0

    say() { printf 'bootstrap: %s\n' "$*"; }
    die() { printf 'bootstrap: ERROR: %s\n' "$*" >&2; exit 1; }

    as_root() {
        if [ "$(id -u)" -eq 0 ]; then
            "$@"
        elif command -v sudo >/dev/null 2>&1; then
            sudo -n "$@"
        else
            die "need root to run: $* (re-run as root, or install it yourself)"
        fi
    }

    apt_install() {
        command -v apt-get >/dev/null 2>&1 \
            || die "apt-get not found: install $* with your package manager"
        if [ "$apt_updated" -eq 0 ]; then
            say "running apt-get update"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
            apt_updated=1
        fi
        say "running apt-get install -y $*"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" </dev/null
    }

    # tcp_up PORT: is something listening on 127.0.0.1:PORT?
    tcp_up() {
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    }

    # -- Python and the venv ---------------------------------------------

    command -v "$python" >/dev/null 2>&1 \
        || die "$python not found: install Python >= 3.10 (Debian: apt-get install python3 python3-venv)"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        die "quebert needs Python >= 3.10, but $python is $("$python" -V 2>&1); set PYTHON=/path/to/python3.x"
    fi

    if [ -d "$venv" ] && ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        say "$venv is broken or too old; recreating it"
        rm -rf "$venv"
    fi
    if [ ! -x "$venv/bin/python" ]; then
        if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
            say "$python cannot create virtualenvs (no ensurepip)"
            apt_install python3-venv
        fi
        say "creating $venv with $("$python" -V 2>&1)"
        "$python" -m venv "$venv"
        # An old bundled pip may lack --config-settings (pip >= 22.1).
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input \
            --upgrade pip || say "could not upgrade pip; going on with $("$venv/bin/pip" -V)"
        rm -f "$stamp"
    fi

    # Reinstall only when the packaging metadata changed (or never installed).
    local want have=""
    # (The path is part of it: a compat install points at this directory.)
    want="$( { echo "$root"; cat setup.cfg; cat setup.py pyproject.toml 2>/dev/null || true; } \
        | sha256sum | cut -d' ' -f1)"
    [ -f "$stamp" ] && have="$(cat "$stamp")"
    if [ "$want" != "$have" ] || [ ! -x "$venv/bin/twistd" ] || [ ! -x "$venv/bin/trial" ]; then
        say "installing quebert into $venv (pip install -e '.[test,guillotina,docs]', editable_mode=compat)"
        # compat mode puts the source tree on sys.path (a .pth entry), which
        # is how twistd finds twisted/plugins/quebert_plugin.py; the default
        # PEP 660 import hook would hide the plugin.  The guillotina extra
        # is there for the bridge's tests (and its API reference);
        # guillotina builds C extensions from source, so it needs a C
        # compiler and Python's headers.  The docs extra is Sphinx, for
        # scripts/build-docs.sh (run by scripts/run-tests.sh too).
        if ! command -v cc >/dev/null 2>&1; then
            say "no C compiler (needed to build guillotina)"
            apt_install gcc libc6-dev
        fi
        if ! "$venv/bin/python" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
            say "no Python.h for $("$venv/bin/python" -V 2>&1) (needed to build guillotina)"
            apt_install python3-dev
        fi
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input \
            --config-settings editable_mode=compat -e '.[test,guillotina,docs]'
        printf '%s\n' "$want" >"$stamp"
    else
        say "$venv is up to date"
    fi

    # -- Chromium, for the console's browser tests (tests/test_console_browser.py):
    # Debian's, which Playwright drives (Playwright's own browser download
    # is not used).  QUEBERT_SKIP_BROWSER=1 leaves it out (the example run).
    if [ "${QUEBERT_SKIP_BROWSER:-0}" != 1 ] && [ ! -x "${QUEBERT_CHROMIUM:-/usr/bin/chromium}" ]; then
        say "Chromium is not installed (the console's browser tests use it)"
        apt_install chromium
    fi

    if [ "${QUEBERT_SKIP_SERVICES:-0}" = 1 ]; then
        return 0
    fi

    # -- Redis -------------------------------------------------------------

    if tcp_up "$redis_port"; then
        say "Redis is up on 127.0.0.1:$redis_port"
    else
        if ! command -v redis-server >/dev/null 2>&1; then
            say "redis-server is not installed"
            apt_install redis-server
        fi
        if ! tcp_up "$redis_port"; then  # the package may have started it
            say "starting redis-server on 127.0.0.1:$redis_port (no persistence)"
            redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" \
                --save "" --appendonly no </dev/null >/dev/null
        fi
        local i
        for i in $(seq 1 30); do
            if [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" = PONG ]; then
                break
            fi
            [ "$i" -eq 30 ] && die "Redis did not answer PING on 127.0.0.1:$redis_port within 15 s"
            sleep 0.5
        done
        say "Redis is up on 127.0.0.1:$redis_port"
    fi

    # -- RabbitMQ ----------------------------------------------------------

    if tcp_up "$amqp_port"; then
        say "RabbitMQ is up on 127.0.0.1:$amqp_port"
    else
        if ! command -v rabbitmq-server >/dev/null 2>&1; then
            say "rabbitmq-server is not installed"
            apt_install rabbitmq-server
        fi
        if [ "$amqp_port" != 5672 ]; then
            export RABBITMQ_NODE_PORT="$amqp_port"
        fi
        local wait_s="${RABBITMQ_WAIT:-90}"
        if ! tcp_up "$amqp_port" && ! timeout 15 rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
            say "starting rabbitmq-server -detached"
            rabbitmq-server -detached </dev/null
        elif ! tcp_up "$amqp_port"; then
            say "RabbitMQ node is running but not listening yet; waiting"
        fi
        say "waiting up to ${wait_s}s for RabbitMQ on 127.0.0.1:$amqp_port"
        local deadline=$((SECONDS + wait_s))
        until tcp_up "$amqp_port" && timeout 15 rabbitmq-diagnostics -q ping >/dev/null 2>&1; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                die "RabbitMQ did not come up within ${wait_s}s; see /var/log/rabbitmq/ (rabbitmq-diagnostics status)"
            fi
            sleep 2
        done
        timeout 30 rabbitmqctl await_startup >/dev/null 2>&1 || true
        say "RabbitMQ is up on 127.0.0.1:$amqp_port"
    fi
}

# Sourced: run in a subshell so `set -e` and `exit` never touch the caller's
# shell.  Run: plain call.
if (return 0 2>/dev/null); then
    (_quebert_bootstrap "$@")
else
    _quebert_bootstrap "$@"
fi
