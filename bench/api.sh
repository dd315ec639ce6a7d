#!/usr/bin/env bash
# API benchmark: throughput and latency percentiles of a read endpoint (GET /v1/tenants/{id}) and
# of an idempotent replay (POST with a used Idempotency-Key), against the floor — the same
# single-row query in a bare actix handler (bench/api_floor.rs), with and without JWT checks.
#
#   bash bench/api.sh            # needs wrk (apt-get install wrk) and PostgreSQL (DATABASE_URL)
#
# Writes bench/results/api-<date>.md with the machine it ran on. Load comes from wrk on the same
# machine, so absolute numbers include the load generator's share of the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
ADMIN_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=mailscope_bench
DB_URL=$(printf '%s' "$ADMIN_URL" | sed -E "s#/[^/?]*(\?|$)#/$DB\1#")
SECRET=bench-secret-0123456789-0123456789-0123
KEY=$(head -c 32 /dev/urandom | base64)
TENANT=0b1c6a36-6b53-4bcb-8e56-0d4f5c7f3a11
API=127.0.0.1:18080
FLOOR=127.0.0.1:18081
command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }

cargo build --release --quiet
cargo bench --bench api_floor --no-run --quiet 2>/dev/null
FLOOR_BIN=$(ls -t target/release/deps/api_floor-* | grep -v '\.d$' | head -n 1)

psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
export DATABASE_URL=$DB_URL MAILSCOPE_ENCRYPTION_KEY=$KEY MAILSCOPE_AUTH__HS256_SECRET=$SECRET \
  MAILSCOPE_LISTEN=$API MAILSCOPE_LOG_FILTER=warn MAILSCOPE_HTTP__WORKERS=2
target/release/mailscope serve --no-worker >/tmp/mailscope-bench.log 2>&1 &
API_PID=$!
"$FLOOR_BIN" "$DB_URL" "$FLOOR" "$SECRET" >/dev/null 2>&1 &
FLOOR_PID=$!
trap 'kill $API_PID $FLOOR_PID 2>/dev/null; wait 2>/dev/null; psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null' EXIT
for _ in $(seq 1 100); do curl -sf "http://$API/readyz" >/dev/null && break; sleep 0.2; done
TOKEN=$(target/release/mailscope token --ttl 3600)

curl -sf -X PUT "http://$API/v1/tenants/$TENANT" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{
  "display_name": "Bench", "cloud": "custom", "default_domain": "bench.onmicrosoft.com",
  "endpoints": {"login": "http://127.0.0.1:9", "graph": "http://127.0.0.1:9", "exchange": "http://127.0.0.1:9"},
  "credentials": {"client_id": "6f1d7c55-2b1e-4d2a-9c65-8f3a1c2b4d5e", "client_secret": "x"}}' >/dev/null
# One real run stores the response; every later request with the same key is a replay.
curl -sf -X POST "http://$API/v1/tenants/$TENANT/connection-test" -H "Authorization: Bearer $TOKEN" \
  -H 'Idempotency-Key: "bench-replay"' >/dev/null

post_lua=$(mktemp --suffix .lua)
cat >"$post_lua" <<LUA
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.headers["Idempotency-Key"] = '"bench-replay"'
LUA
run() { # name method url [auth]
  local out
  if [ "$2" = POST ]; then
    out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$post_lua" "$3")
  elif [ "${4:-}" = auth ]; then
    out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: Bearer $TOKEN" "$3")
  else
    out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "$3")
  fi
  local rps p50 p90 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p90=$(awk '$1=="90%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx or 3xx responses/ {print $NF}' <<<"$out"); non2xx=${non2xx:-0}
  printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$rps" "$p50" "$p90" "$p99" "$non2xx"
}

mkdir -p bench/results
result=bench/results/api-$(date -u +%Y-%m-%d).md
{
  echo "# API benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs), $(free -g | awk '/Mem/ {print $2}') GiB;"
  echo "PostgreSQL $(psql "$ADMIN_URL" -tAc 'show server_version'); wrk -t2 -c$CONNECTIONS -d$DURATION on the same machine; release build, 2 HTTP workers each."
  echo
  echo "Load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other builds share these 2 cores when above ~1)."
  echo
  echo "| endpoint | req/s | p50 | p90 | p99 | non-2xx |"
  echo "|---|---|---|---|---|---|"
  run "floor: GET single-row query, no auth" GET "http://$FLOOR/floor/tenants/$TENANT"
  run "floor: GET single-row query + JWT check" GET "http://$FLOOR/floor-auth/tenants/$TENANT" auth
  run "mailscope: GET /v1/tenants/{id} (auth)" GET "http://$API/v1/tenants/$TENANT" auth
  run "mailscope: GET /healthz (no auth, no query)" GET "http://$API/healthz"
  run "floor: replay row lookup, no auth" POST "http://$FLOOR/floor/replay/bench-replay"
  run "floor: replay row lookup + JWT check" POST "http://$FLOOR/floor-auth/replay/bench-replay"
  run "mailscope: POST Idempotency-Key replay (auth)" POST "http://$API/v1/tenants/$TENANT/connection-test"
} | tee "$result"
echo "written to $result"
