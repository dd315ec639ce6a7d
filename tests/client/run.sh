#!/usr/bin/env bash
# Generate a Python client from the committed openapi/openapi.json and drive the README's
# onboarding through it against `mailscope sandbox` and `mailscope serve`.
#
#   tests/client/run.sh /path/to/mailscope
#
# Needs openapi-python-client on PATH (tests/client/requirements.txt). `serve` runs in a scratch
# directory as the README runs it (its secrets are generated there, `mailscope token` finds them),
# against DATABASE_URL when set (with keys made up for the run), else its embedded PostgreSQL. Both processes stop whatever happens.
set -euo pipefail

bin=$(realpath "${1:?usage: $0 /path/to/mailscope}")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
spec="$here/../../openapi/openapi.json"
python=${PYTHON:-python3}
work=$(mktemp -d)
pids=()

cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "FAIL $1; its log:" >&2
    cat "$2" >&2
    exit 1
}

echo "generating the client from openapi/openapi.json"
openapi-python-client generate --path "$spec" --meta none --output-path "$work/client/mailscope_client" \
    >"$work/generate.log" 2>&1 || fail "openapi-python-client could not generate a client" "$work/generate.log"

"$bin" sandbox --listen 127.0.0.1:0 --propagation-delay 200ms..2s --rbac-propagation-delay 200ms..2s \
    --rbac-app-cache-idle 500ms --rbac-app-cache-lifetime 2s \
    --replication-delay 0s --seed 1 >"$work/sandbox.log" 2>&1 &
pids+=($!)

# With an external database, serve takes its keys from the environment (and `token` the same).
if [[ -n "${DATABASE_URL:-}" ]]; then
    MAILSCOPE_ENCRYPTION_KEY=$("$python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
    MAILSCOPE_AUTH__HS256_SECRET=$("$python" -c 'import secrets; print(secrets.token_urlsafe(48))')
    export MAILSCOPE_ENCRYPTION_KEY MAILSCOPE_AUTH__HS256_SECRET
fi
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir "$work/serve"
(cd "$work/serve" && MAILSCOPE_LISTEN="127.0.0.1:$port" MAILSCOPE_PROPAGATION__FIRST_DELAY_MS=500 \
    MAILSCOPE_PROPAGATION__MAX_DELAY_MS=2000 MAILSCOPE_PROPAGATION__REQUIRED_MATCHES=2 \
    exec "$bin" serve) >"$work/serve.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 600); do
    grep -q '^SANDBOX_CLIENT_SECRET=' "$work/sandbox.log" && curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    kill -0 "${pids[0]}" 2>/dev/null || fail "mailscope sandbox exited" "$work/sandbox.log"
    kill -0 "${pids[1]}" 2>/dev/null || fail "mailscope serve exited" "$work/serve.log"
    sleep 0.1
done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || fail "mailscope serve was not ready in 60 s" "$work/serve.log"

while IFS='=' read -r key value; do
    export "$key=$value"
done < <(grep -E '^SANDBOX_(URL|TENANT_ID|CLIENT_ID|CLIENT_SECRET)=' "$work/sandbox.log")
export API_URL="http://127.0.0.1:$port"
API_TOKEN=$(cd "$work/serve" && "$bin" token)
export API_TOKEN

"$python" "$here/onboarding.py" "$work/client" || fail "the onboarding did not complete" "$work/serve.log"
