#!/usr/bin/env bash
# Microsoft's own Python clients against `mailscope sandbox --tls`: MSAL, azure-identity and the
# Graph SDK, each unmodified and given only the CA file the sandbox prints.
#
#   tests/clients/run.sh /path/to/mailscope
#
# Needs the packages of tests/clients/requirements.txt (PYTHON= picks the interpreter). Starts the
# sandbox with TLS on a free port and no delays, in a throwaway TLS directory, runs the three
# checks and stops the sandbox whatever happens.
set -euo pipefail

bin=${1:?usage: $0 /path/to/mailscope}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
log=$(mktemp)
tls_dir=$(mktemp -d)
pid=

cleanup() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$log" "$tls_dir"
}
trap cleanup EXIT

"$bin" sandbox --tls --tls-dir "$tls_dir" --listen 127.0.0.1:0 --propagation-delay 0s \
    --rbac-propagation-delay 0s --rbac-app-cache-idle 0s --rbac-app-cache-lifetime 0s --replication-delay 0s --seed 1 >"$log" 2>&1 &
pid=$!

for _ in $(seq 1 300); do
    grep -q '^SANDBOX_CA_FILE=' "$log" && break
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "sandbox exited early:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.1
done
if ! grep -q '^SANDBOX_CA_FILE=' "$log"; then
    echo "sandbox did not print its CA file in time:" >&2
    cat "$log" >&2
    exit 1
fi
while IFS='=' read -r key value; do
    export "$key=$value"
done < <(grep -E '^SANDBOX_(URL|TENANT_ID|CLIENT_ID|CLIENT_SECRET|CA_FILE)=' "$log")

# requests (under MSAL and azure-identity) lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a
# session's `verify`: point them at the sandbox's CA too, as a user of these libraries would.
export REQUESTS_CA_BUNDLE="$SANDBOX_CA_FILE"
unset CURL_CA_BUNDLE

status=0
for check in check_msal.py check_azure_identity.py check_msgraph_sdk.py; do
    echo "--- $check"
    (cd "$here" && "$python" "$check") || status=1
done
exit $status
