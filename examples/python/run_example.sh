#!/usr/bin/env bash
# Runs the Python examples against a fresh licensd, as CI does:
#
#   examples/python/run_example.sh [PATH/TO/licensd]    # default target/debug/licensd
#
# Installs requirements.txt into a virtualenv under ${TMPDIR:-/tmp} (reused
# while requirements.txt and the interpreter stay the same), creates an admin
# token in a new SQLite database, starts `licensd serve` on a free loopback
# port, runs billing_example.py, verify_offline.py and event_consumer.py
# against it, stops the server and exits with the status of the first
# example that failed (0 when all passed; none runs after a failure). The
# whole run
# is bounded by LICENSD_EXAMPLE_TIMEOUT seconds (default 300: a first run
# downloads the packages from PyPI).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# Bound the whole run: re-run this script under timeout(1), which signals
# every process of the run (the server included) when the time is up.
if [ -z "${LICENSD_EXAMPLE_BOUNDED:-}" ]; then
    export LICENSD_EXAMPLE_BOUNDED=1
    status=0
    timeout --kill-after=15 "${LICENSD_EXAMPLE_TIMEOUT:-300}" bash "${BASH_SOURCE[0]}" "$@" || status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        echo "run_example.sh: timed out after ${LICENSD_EXAMPLE_TIMEOUT:-300} s" >&2
    fi
    exit "$status"
fi

bin="${1:-$root/target/debug/licensd}"
if [ ! -x "$bin" ]; then
    echo "run_example.sh: no licensd binary at $bin (build it first: cargo build)" >&2
    exit 2
fi
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
python="${PYTHON:-python3}"
# Settings from the environment that would change what the example talks to.
unset LICENSD_TLS_CERT LICENSD_TLS_KEY LICENSD_TLS_CLIENT_CA LICENSD_DATABASE_URL LICENSD_LISTEN

work="$(mktemp -d "${TMPDIR:-/tmp}/licensd-py-example.XXXXXX")"
server_pid=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    local status=$?
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [ "$status" -ne 0 ] && [ -s "$work/server.log" ]; then
        echo "--- licensd log (last 40 lines) ---" >&2
        tail -n 40 "$work/server.log" >&2
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# 1. A virtualenv with the pinned packages, keyed by requirements and interpreter.
key="$( { cat "$here/requirements.txt"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)"
venv="${TMPDIR:-/tmp}/licensd-py-example-venv-$key"
if [ ! -f "$venv/.complete" ]; then
    echo "Installing $here/requirements.txt into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$here/requirements.txt"
    touch "$venv/.complete"
else
    echo "Using the virtualenv $venv"
fi

# 2. A fresh database with an admin token (`token create` migrates the schema
#    and prints only the token on stdout).
db="sqlite:$work/ex.db"
token="$("$bin" token create --role admin --name example --database-url "$db" 2>"$work/token.log")" || {
    cat "$work/token.log" >&2
    echo "run_example.sh: licensd token create failed" >&2
    exit 1
}

# 3. The server, on a free loopback port; its JSON log names the address.
RUST_LOG=info "$bin" serve --listen 127.0.0.1:0 --database-url "$db" --log-format json \
    --drain-seconds 1 >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
addr=""
for _ in $(seq 300); do
    addr="$(grep '"licensd serving"' "$work/server.log" 2>/dev/null \
        | grep -o '"addr":"[^"]*"' | head -n 1 | cut -d'"' -f4 || true)"
    [ -n "$addr" ] && break
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "run_example.sh: licensd exited before serving" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$addr" ]; then
    echo "run_example.sh: licensd did not log its address within 30 s" >&2
    exit 1
fi
echo "licensd (pid $server_pid) is serving on $addr"

# 4. The examples, one after the other against the same server; the first
#    failure's status is this script's.
export PYTHONDONTWRITEBYTECODE=1
for example in billing_example.py verify_offline.py event_consumer.py; do
    echo
    echo "=== $example"
    status=0
    "$venv/bin/python" "$here/$example" --target "$addr" --token "$token" \
        --proto-dir "$root/proto" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "run_example.sh: $example failed (status $status)" >&2
        exit "$status"
    fi
done
exit 0
