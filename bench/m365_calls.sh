#!/usr/bin/env bash
# Microsoft calls per scope-group onboarding: PUT /scope-groups/{alias} with N new mailboxes
# (N = 1, 10, 100, 1000), then the same PUT again (nothing to change), counted by the sandbox's
# per-endpoint counters (GET /_sandbox/counters). Everything runs on 127.0.0.1: the sandbox,
# mailscope (release build, API only) and PostgreSQL.
#
#   bash bench/m365_calls.sh      # needs PostgreSQL (DATABASE_URL, admin rights), curl and jq
#
# Writes bench/results/m365-calls-<date>.md with the machine it ran on. SIZES overrides the Ns.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"1 10 100 1000"}
LATENCY=${LATENCY:-0s}
ADMIN_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=mailscope_bench_m365
DB_URL=$(printf '%s' "$ADMIN_URL" | sed -E "s#/[^/?]*(\?|$)#/$DB\1#")
API=127.0.0.1:18180
SB=127.0.0.1:18190
TARGET=${CARGO_TARGET_DIR:-target}
# Call counts do not depend on the build; PROFILE=debug reuses a test build (wall times then are
# a debug build's).
PROFILE=${PROFILE:-release}
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

if [ "$PROFILE" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
BIN=$TARGET/$PROFILE/mailscope
psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
SB_OUT=$(mktemp)
"$BIN" sandbox --listen "$SB" --seed 7 --latency "$LATENCY" --replication-delay 0s \
  --propagation-delay 0s >"$SB_OUT" 2>&1 &
SB_PID=$!
export DATABASE_URL=$DB_URL MAILSCOPE_ENCRYPTION_KEY=$(head -c 32 /dev/urandom | base64) \
  MAILSCOPE_AUTH__HS256_SECRET=bench-secret-0123456789-0123456789-0123 \
  MAILSCOPE_LISTEN=$API MAILSCOPE_LOG_FILTER=warn
"$BIN" serve --no-worker >/tmp/mailscope-m365-calls.log 2>&1 &
API_PID=$!
trap 'kill $API_PID $SB_PID 2>/dev/null; wait 2>/dev/null; rm -f "$SB_OUT"; psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null' EXIT
for _ in $(seq 1 100); do curl -sf "http://$API/readyz" >/dev/null && grep -q SANDBOX_CLIENT_SECRET "$SB_OUT" && break; sleep 0.2; done
val() { sed -n "s/^$1=//p" "$SB_OUT"; }
S=$(val SANDBOX_URL); T=$(val SANDBOX_TENANT_ID)
TOKEN=$("$BIN" token --ttl 3600)
auth=(-H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json')
jq -n --arg s "$S" --arg id "$(val SANDBOX_CLIENT_ID)" --arg secret "$(val SANDBOX_CLIENT_SECRET)" '{
  display_name: "Bench sandbox", cloud: "custom", default_domain: "contoso-sandbox.onmicrosoft.com",
  endpoints: {login: $s, graph: $s, exchange: $s},
  credentials: {client_id: $id, client_secret: $secret}}' |
  curl -sf -X PUT "http://$API/v1/tenants/$T" "${auth[@]}" -d @- >/dev/null

counts() { # → "exchange graph get-recipient"
  curl -sf "$S/_sandbox/counters?tenant=$T" | jq -r '[
    ([to_entries[] | select(.key | startswith("exchange:")) | .value] | add // 0),
    ([to_entries[] | select(.key | startswith("graph:")) | .value] | add // 0),
    (.["exchange:Get-Recipient"] // 0)] | @tsv'
}
cmdlets() { curl -sf "$S/_sandbox/counters?tenant=$T" | jq -r '[to_entries[] | select(.key | startswith("exchange:")) | "\(.key | ltrimstr("exchange:")) \(.value)"] | join(", ")'; }
ROWS=""
for n in $SIZES; do
  members=$(for i in $(seq 1 "$n"); do
    curl -sf -X POST "$S/_sandbox/tenants/$T/mailboxes" -H 'Content-Type: application/json' \
      -d "{\"name\":\"n${n}m$i\"}" | jq -r .primarySmtpAddress
  done | jq -R . | jq -sc '{members: .}')
  curl -sf -X DELETE "$S/_sandbox/counters" >/dev/null
  start=$(date +%s.%N)
  code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT "http://$API/v1/tenants/$T/scope-groups/onboard-$n" "${auth[@]}" -d "$members")
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  read -r exo graph rcpt < <(counts)
  detail=$(cmdlets)
  curl -sf -X DELETE "$S/_sandbox/counters" >/dev/null
  code2=$(curl -s -o /dev/null -w '%{http_code}' -X PUT "http://$API/v1/tenants/$T/scope-groups/onboard-$n" "${auth[@]}" -d "$members")
  read -r exo2 graph2 _ < <(counts)
  detail2=$(cmdlets)
  ROWS+="| $n | $code | $exo ($detail) | $rcpt | $graph | $(printf '%.2f' "$secs") s | $code2 | $exo2 ($detail2) | $graph2 |"$'\n'
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p bench/results
result=bench/results/m365-calls-$(date -u +%Y-%m-%d).md
{
  echo "# Microsoft calls per scope-group onboarding, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs), $(free -h | awk '/Mem/ {print $2}') RAM;"
  echo "load average (1, 5, 15 min) at the start: $LOAD_START; at the end: $LOAD_END. $PROFILE build,"
  echo "\`mailscope sandbox --latency $LATENCY\` and mailscope's default connector limits (Exchange 5 calls/s"
  echo "per tenant, burst 10, 3 at a time). \`bash bench/m365_calls.sh\` reproduces this file."
  echo
  echo "Each row: N new mailboxes, then \`PUT /scope-groups/onboard-N\` naming them (creates the group),"
  echo "then the same PUT again (nothing to change). Calls are the sandbox's counters for the tenant;"
  echo "Graph is not called by this use case."
  echo
  echo "| N | status | Exchange calls (by cmdlet) | of which Get-Recipient | Graph calls | wall time | repeat: status | repeat: Exchange calls | repeat: Graph calls |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s' "$ROWS"
} >"$result"
cat "$result"
