#!/usr/bin/env bash
# Run the MSAL fidelity check against a freshly started `mailscope sandbox`.
#
#   tests/msal/run.sh /path/to/mailscope [extra sandbox flags...]
#
# Builds nothing. Starts `<binary> sandbox` on a free port with short delays (no Entra consistency
# delay: the script checks wire shapes, not a client that waits), reads the URL and
# management credentials it prints, runs check_sandbox.py (needs `pip install msal requests
# cryptography`), and stops the sandbox whatever happens.
set -euo pipefail

bin=${1:?usage: $0 /path/to/mailscope [extra sandbox flags...]}
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
log=$(mktemp)
pid=

cleanup() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -f "$log"
}
trap cleanup EXIT

"$bin" sandbox --listen 127.0.0.1:0 --propagation-delay 200ms..2s --rbac-propagation-delay 200ms..2s \
    --rbac-app-cache-idle 500ms --rbac-app-cache-lifetime 2s \
    --replication-delay 0s --entra-consistency-delay 0s --seed 1 "$@" >"$log" 2>&1 &
pid=$!

for _ in $(seq 1 300); do
    grep -q '^SANDBOX_CLIENT_SECRET=' "$log" && break
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "sandbox exited early:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.1
done
if ! grep -q '^SANDBOX_CLIENT_SECRET=' "$log"; then
    echo "sandbox did not print its credentials in time:" >&2
    cat "$log" >&2
    exit 1
fi

while IFS='=' read -r key value; do
    export "$key=$value"
done < <(grep -E '^SANDBOX_(URL|TENANT_ID|CLIENT_ID|CLIENT_SECRET)=' "$log")

"$python" "$here/check_sandbox.py" --check-propagation --wait 30
