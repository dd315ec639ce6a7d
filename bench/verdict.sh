#!/usr/bin/env bash
# Verdict latency (issue 15, goal 4): the wall-clock time from the moment every Graph front end
# enforces an application access policy to the moment its propagation check ends `succeeded`,
# with mailscope's default propagation settings and a sandbox whose front ends all switch after a
# fixed delay. Everything runs on 127.0.0.1: the sandbox, `mailscope serve` (API and worker) and
# PostgreSQL.
#
#   bash bench/verdict.sh        # needs PostgreSQL (DATABASE_URL, admin rights), curl, jq and bc
#
# DELAYS (default "20 20 20 47") are the fixed delays in seconds, one run each; PROFILE=debug
# reuses a test build (the figure is set by the check's intervals, not by the build).
# SKIP_BUILD=1 uses the binary already built.
# Writes bench/results/verdict-<date>.md with the machine and the load.
set -euo pipefail
cd "$(dirname "$0")/.."
DELAYS=${DELAYS:-"20 20 20 47"}
ADMIN_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=mailscope_bench_verdict
DB_URL=$(printf '%s' "$ADMIN_URL" | sed -E "s#/[^/?]*(\?|$)#/$DB\1#")
API=127.0.0.1:18280
SB=127.0.0.1:18290
TARGET=${CARGO_TARGET_DIR:-target}
PROFILE=${PROFILE:-release}
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -n "${SKIP_BUILD:-}" ]; then :; elif [ "$PROFILE" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
BIN=$TARGET/$PROFILE/mailscope
SB_OUT=$(mktemp)
PIDS=""
export DATABASE_URL=$DB_URL MAILSCOPE_ENCRYPTION_KEY=$(head -c 32 /dev/urandom | base64) \
  MAILSCOPE_AUTH__HS256_SECRET=bench-secret-0123456789-0123456789-0123 \
  MAILSCOPE_LISTEN=$API MAILSCOPE_LOG_FILTER=warn
cleanup() {
  # shellcheck disable=SC2086
  [ -n "$PIDS" ] && kill $PIDS 2>/dev/null; wait 2>/dev/null || true
  psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap 'cleanup; rm -f "$SB_OUT"' EXIT
now() { date +%s.%N; }
epoch() { date -d "$1" +%s.%N; }
ROWS=""

for delay in $DELAYS; do
  cleanup; PIDS=""
  psql "$ADMIN_URL" -qc "CREATE DATABASE $DB" >/dev/null
  "$BIN" sandbox --listen "$SB" --seed 7 --latency 0s --replication-delay 0s \
    --propagation-delay "${delay}s" >"$SB_OUT" 2>&1 &
  PIDS="$PIDS $!"
  "$BIN" serve >/tmp/mailscope-verdict.log 2>&1 &
  PIDS="$PIDS $!"
  for _ in $(seq 1 150); do
    curl -sf "http://$API/readyz" >/dev/null && grep -q SANDBOX_CLIENT_SECRET "$SB_OUT" && break
    sleep 0.2
  done
  val() { sed -n "s/^$1=//p" "$SB_OUT"; }
  S=$(val SANDBOX_URL); T=$(val SANDBOX_TENANT_ID)
  TOKEN=$("$BIN" token --ttl 3600)
  auth=(-H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json')
  V="http://$API/v1/tenants/$T"
  jq -n --arg s "$S" --arg id "$(val SANDBOX_CLIENT_ID)" --arg secret "$(val SANDBOX_CLIENT_SECRET)" '{
    display_name: "Bench sandbox", cloud: "custom", default_domain: "contoso-sandbox.onmicrosoft.com",
    endpoints: {login: $s, graph: $s, exchange: $s},
    credentials: {client_id: $id, client_secret: $secret}}' |
    curl -sf -X PUT "$V" "${auth[@]}" -d @- >/dev/null
  mbx() { curl -sf -X POST "$S/_sandbox/tenants/$T/mailboxes" -H 'Content-Type: application/json' \
    -d "{\"name\":\"$1\"}" | jq -r .primarySmtpAddress; }
  in1=$(mbx verdict-in1); in2=$(mbx verdict-in2); canary=$(mbx verdict-canary)
  app=$(curl -sf -X PUT "$V/applications/verdict" "${auth[@]}" \
    -d '{"display_name": "Verdict bench", "permissions": ["Mail.Read"], "grant_admin_consent": true}' | jq -r .app_id)
  jq -n --arg a "$in1" --arg b "$in2" '{members: [$a, $b]}' |
    curl -sf -X PUT "$V/scope-groups/verdict-scope" "${auth[@]}" -d @- >/dev/null
  # Let the group's own propagation settle so only the policy is in flight.
  curl -sf -X POST "$S/_sandbox/tenants/$T/propagation/settle" >/dev/null
  check=$(jq -n --arg app "$app" --arg c "$canary" \
    '{app_id: $app, scope: "verdict-scope", access_right: "RestrictAccess", canary_mailboxes: [$c]}' |
    curl -sf -X POST "$V/access-policies" "${auth[@]}" -d @- | jq -r .propagation_check.id)
  # When the last front end adopts the policy, on this machine's clock.
  pending=$(curl -sf "$S/_sandbox/tenants/$T/propagation" |
    jq '[.applicationAccessPolicies.frontEnds[].pending[].inSeconds] | max // 0')
  enforced=$(echo "$(now) + $pending" | bc)
  state=queued
  while [ "$state" = queued ] || [ "$state" = running ]; do
    c=$(curl -sf "$V/propagation-checks/$check?wait=30" "${auth[@]}")
    state=$(jq -r .state <<<"$c")
  done
  seen=$(now)
  finished=$(epoch "$(jq -r .finished_at <<<"$c")")
  k=$(jq -r .required_matches <<<"$c")
  after=$(echo "$finished - $enforced" | bc)
  ROWS+="| $delay s | $state | $(printf '%.1f' "$after") s | $(printf '%.1f' "$(echo "$seen - $enforced" | bc)") s | $(jq -r '"\(.propagation_seconds.at_least) – \(.propagation_seconds.at_most) s"' <<<"$c") | $(jq -r .attempts <<<"$c") | $(( (k + 1) * 10 )) s | $(cut -d' ' -f1 /proc/loadavg) |"$'\n'
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p bench/results
result=bench/results/verdict-$(date -u +%Y-%m-%d).md
{
  echo "# Verdict latency, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs), $(free -h | awk '/Mem/ {print $2}') RAM;"
  echo "load average (1, 5, 15 min) at the start: $LOAD_START; at the end: $LOAD_END. $PROFILE build."
  echo "\`bash bench/verdict.sh\` reproduces this file."
  echo
  echo "Each row: a fresh database, \`mailscope sandbox --propagation-delay <delay>\` (every Graph front"
  echo "end adopts a change exactly that long after it) and \`mailscope serve\` with the default"
  echo "propagation settings (looks 10 s, then at most 15 s apart; confirmations every 10 s; 3"
  echo "matches in a row). A RestrictAccess policy over a group of two mailboxes with one canary"
  echo "starts its check; *enforced* is when the sandbox's last front end adopts it (its"
  echo "propagation status, read right after the POST). *Succeeded after* is the check's"
  echo "\`finished_at\` minus that instant; *seen after* is when the client's long poll returned."
  echo "The goal: within (required_matches + 1) × confirm interval."
  echo
  echo "| fixed delay | state | succeeded after enforcement | seen by the client after | propagation_seconds (bracket) | job runs | goal | load (1 min) |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s' "$ROWS"
} >"$result"
cat "$result"
