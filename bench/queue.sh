#!/usr/bin/env bash
# Queue benchmark: enqueue rate, no-op drain throughput with 1, 2 and 4 workers beside
# graphile-worker and pgqueuer on the same PostgreSQL server, the raw SQL limit (pgbench running
# claim-10 + complete with nothing else), and the scale check (claim latency with
# 100,000 queued jobs over 1,000 and 10,000 tenants, and 400,000 in one tenant). Every run uses a fresh database, dropped afterwards.
#
#   bash bench/queue.sh        # needs PostgreSQL (DATABASE_URL, admin rights), pgbench, node + npm
#                              # and python3 (pgqueuer is installed, pinned, in a venv under
#                              # ${XDG_CACHE_HOME:-~/.cache}/mailscope-bench)
#
# Writes bench/results/queue-<date>.md. JOBS (default 20000) sets the enqueue and drain size.
set -euo pipefail
cd "$(dirname "$0")/.."
ADMIN_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
JOBS=${JOBS:-20000}
# All jobs in one tenant under a cap of 4 drain slowly; a quarter of the jobs shows the cost.
ONE_TENANT_JOBS=$((JOBS / 4))
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# The load average decays over minutes (a run just before this one still shows), so whether the
# machine is idle now is read from the CPU counters over three seconds: the busy share, in %.
cpu_busy() {
  local a b
  a=($(head -n1 /proc/stat)); sleep 3; b=($(head -n1 /proc/stat))
  awk -v u="$(( (b[1]+b[2]+b[3]+b[6]+b[7]+b[8]) - (a[1]+a[2]+a[3]+a[6]+a[7]+a[8]) ))" \
      -v i="$(( (b[4]+b[5]) - (a[4]+a[5]) ))" 'BEGIN { printf "%.0f", 100 * u / (u + i) }'
}
BUSY_START=$(cpu_busy)

# QUEUE_BENCH_BIN reuses a bench binary already built from this tree (a release build takes long
# on a loaded machine).
if [ -z "${QUEUE_BENCH_BIN:-}" ]; then
  cargo bench --bench queue_bench --no-run --quiet 2>/dev/null
fi
BIN=${QUEUE_BENCH_BIN:-$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/queue_bench-* | grep -v '\.d$' | head -n 1)}
(cd bench/graphile && npm ci --silent --no-audit --no-fund)
PGQ_VERSION=1.6.0
PGQ_VENV=${XDG_CACHE_HOME:-$HOME/.cache}/mailscope-bench/pgqueuer-$PGQ_VERSION
if [ ! -x "$PGQ_VENV/bin/python" ] || ! "$PGQ_VENV/bin/python" -c 'import pgqueuer, asyncpg' 2>/dev/null; then
  python3 -m venv "$PGQ_VENV"
  "$PGQ_VENV/bin/pip" install -q "pgqueuer==$PGQ_VERSION" "asyncpg==0.32.0"
fi

# The end load includes this script's own workers, so it cannot tell whether something else ran.
# A sampler counts the seconds in which a compiler (the usual neighbour on a shared 2-core
# machine) was running beside the benchmark.
BUSY_FILE=$(mktemp)
( while sleep 1; do
    if ps -eo comm= | grep -qxE 'rustc|cc1|cc1plus|ld|cargo'; then echo busy; else echo idle; fi
  done >>"$BUSY_FILE" ) &
SAMPLER=$!

GW_DB=mailscope_qbench_graphile
GW_URL=$(printf '%s' "$ADMIN_URL" | sed -E "s#/[^/?]*(\?|$)#/$GW_DB\1#")
PEER_DB=mailscope_qbench_peer
PEER_URL=$(printf '%s' "$ADMIN_URL" | sed -E "s#/[^/?]*(\?|$)#/$PEER_DB\1#")
trap 'kill $SAMPLER 2>/dev/null; rm -f "$BUSY_FILE"; psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $GW_DB WITH (FORCE)" -c "DROP DATABASE IF EXISTS $PEER_DB WITH (FORCE)" >/dev/null 2>&1' EXIT
fresh_peer_db() {
  psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $PEER_DB WITH (FORCE)" -c "CREATE DATABASE $PEER_DB" >/dev/null
}
pgqueuer() { # processes
  fresh_peer_db
  "$PGQ_VENV/bin/python" bench/pgqueuer/runner.py "$PEER_URL" "$JOBS" "$1"
  psql "$ADMIN_URL" -qc "DROP DATABASE $PEER_DB WITH (FORCE)" >/dev/null
}
RAW_SECONDS=8
raw_sql() { # clients: jobs/s of claim-10 + complete with nothing else (pgbench)
  fresh_peer_db
  psql "$PEER_URL" -q -v rows=400000 -f bench/pgbench/setup.sql >/dev/null
  local tps
  tps=$(pgbench -n -f bench/pgbench/claim10_complete.sql -c "$1" -j "$(( $1 < 2 ? 1 : 2 ))" \
    -T "$RAW_SECONDS" "$PEER_URL" 2>/dev/null | awk '/^tps/ {print $3}')
  psql "$ADMIN_URL" -qc "DROP DATABASE $PEER_DB WITH (FORCE)" >/dev/null
  awk -v t="$tps" 'BEGIN { printf "%.0f", t * 10 }'
}
graphile() { # processes
  psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $GW_DB WITH (FORCE)" -c "CREATE DATABASE $GW_DB" >/dev/null
  node bench/graphile/runner.js "$GW_URL" "$JOBS" "$1"
  psql "$ADMIN_URL" -qc "DROP DATABASE $GW_DB WITH (FORCE)" >/dev/null
}
json() { node -e 'const o=JSON.parse(process.argv[1]); console.log(o[process.argv[2]])' "$1" "$2"; }

echo "enqueue…" >&2
ENQUEUE=$("$BIN" "$ADMIN_URL" enqueue "$JOBS")
echo "drain…" >&2
DRAIN=""
for w in 1 2 4; do DRAIN+=$("$BIN" "$ADMIN_URL" drain "$JOBS" "$w" 100 64)$'\n'; done
for w in 1 4; do DRAIN+=$("$BIN" "$ADMIN_URL" drain "$ONE_TENANT_JOBS" "$w" 1 4)$'\n'; done
echo "graphile-worker…" >&2
GW=""
GW_ENQ=""
for p in 1 2 4; do
  out=$(graphile "$p")
  GW+="| graphile-worker $(json "$out" drain_secs >/dev/null; node -p 'require("./bench/graphile/node_modules/graphile-worker/package.json").version') | $p process(es) × concurrency 16 | – (no queue names) | – | $JOBS | $(json "$out" drain_secs) s | $(json "$out" drain_jobs_per_s) |"$'\n'
  GW_ENQ=${GW_ENQ:-$(json "$out" enqueue_batch100_jobs_per_s)}
done
echo "pgqueuer…" >&2
PGQ=""
PGQ_ENQ=""
for p in 1 4; do
  out=$(pgqueuer "$p")
  PGQ+="| pgqueuer $PGQ_VERSION | $p process(es), dequeue batch 10 (its default) | – (no queue names) | – | $JOBS | $(json "$out" drain_secs) s | $(json "$out" drain_jobs_per_s) |"$'\n'
  PGQ_ENQ=${PGQ_ENQ:-$(json "$out" enqueue_batch100_jobs_per_s)}
done
echo "raw SQL limit…" >&2
RAW=""
for c in 1 4 8; do
  RAW+="| $c | $(raw_sql "$c") |"$'\n'
done
echo "scale…" >&2
SCALE=$("$BIN" "$ADMIN_URL" scale 100000 1000)
SCALE_10K_OUT=$("$BIN" "$ADMIN_URL" scale 100000 10000)
SCALE_ONE_OUT=$("$BIN" "$ADMIN_URL" scale 400000 1)
SCALE_10K=$(sed -n '/^CLAIMS$/,/^ELAPSED/p' <<<"$SCALE_10K_OUT" | grep '^|')
SCALE_ONE=$(sed -n '/^CLAIMS$/,/^ELAPSED/p' <<<"$SCALE_ONE_OUT" | grep '^|')
# "FLOOR p50 p90 p99 max" → a table row.
floor_row() { awk -v what="$2" '/^FLOOR / {printf "| %s | %s | %s | %s | %s |\n", what, $2, $3, $4, $5}' <<<"$1"; }
FLOOR=$(floor_row "$SCALE" "before the 1,000-tenant run")$'\n'$(floor_row "$SCALE_10K_OUT" "before the 10,000-tenant run")$'\n'$(floor_row "$SCALE_ONE_OUT" "before the one-tenant run")
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY=$(grep -c busy "$BUSY_FILE" || true)
SAMPLED=$(wc -l <"$BUSY_FILE")
REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- src migrations bench 2>/dev/null)" ]; then REV="$REV plus uncommitted changes"; fi

CLAIMS=$(sed -n '/^CLAIMS$/,/^ELAPSED/p' <<<"$SCALE" | grep '^|')
ELAPSED=$(awk '/^ELAPSED/ {print $2}' <<<"$SCALE")
PLAN=$(sed -n '/^PLAN$/,$p' <<<"$SCALE" | tail -n +2)
P50_FULL=$(awk -F'|' 'NR==1 {gsub(/ /,"",$6); print $6}' <<<"$CLAIMS")
P50_LOW=$(awk -F'|' 'END {gsub(/ /,"",$6); print $6}' <<<"$CLAIMS")
pessimistic() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 20 || b > 0) print "yes" }'; }

mkdir -p bench/results
result=bench/results/queue-$(date -u +%Y-%m-%d).md
{
  echo "# Queue benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs), $(free -g | awk '/Mem/ {print $2}') GiB;"
  echo "PostgreSQL $(psql "$ADMIN_URL" -tAc 'show server_version') on the same machine (synchronous_commit=$(psql "$ADMIN_URL" -tAc 'show synchronous_commit'))."
  echo "CPU busy in the 3 s before the start: $BUSY_START %. A compiler was running beside the benchmark in"
  echo "$BUSY of the $SAMPLED seconds sampled. Load average (1, 5, 15 min) at the start: $LOAD_START; at the"
  echo "end (the benchmark's own processes included): $LOAD_END."
  if [ "$(pessimistic "$BUSY_START" "$BUSY")" = yes ]; then
    echo
    echo "**Something else was running (CPU more than 20 % busy at the start, or a compiler beside"
    echo "the benchmark): every figure below is pessimistic, ours and the peers' alike. Compare them with"
    echo "each other, not with another run.**"
  fi
  echo
  echo "Release build of $REV. Each run has its own fresh database. \`bash bench/queue.sh\` reproduces this file."
  echo
  echo "## Enqueue rate"
  echo
  echo "Jobs spread over 100 tenants, payload \`{\"n\": i}\`; every call is \`queue::enqueue\` (one"
  echo "INSERT … ON CONFLICT per job; its statement trigger lowers the tenant's bound and NOTIFYs)."
  echo
  echo "| how | jobs | wall time | jobs/s |"
  echo "|---|---|---|---|"
  echo "$ENQUEUE"
  echo "| graphile-worker \`addJobs\`, 100 jobs per call (one statement), 1 task | $JOBS | | $GW_ENQ |"
  echo "| pgqueuer \`Queries.enqueue\`, 100 jobs per call (one statement), 1 task | $JOBS | | $PGQ_ENQ |"
  echo
  echo "## No-op job throughput"
  echo
  echo "Jobs queued up front (one INSERT, not timed), then drained by N \`Worker\`s in one process,"
  echo "each with its own pool of 16 connections and a LISTEN connection, concurrency 16, poll"
  echo "interval 100 ms; wall time from starting the workers until no job is queued or running."
  echo "graphile-worker: N node processes (\`run()\`, concurrency 16, pollInterval 100 ms), timed"
  echo "from the first process ready until its job table is empty."
  echo
  echo "| queue | workers | tenants | per-tenant cap | jobs | wall time | jobs/s |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s' "$DRAIN"
  printf '%s' "$GW"
  printf '%s' "$PGQ"
  echo
  echo "pgqueuer: N Python processes (\`QueueManager.run\`, drain mode, dequeue batch 10), timed from"
  echo "all connected until every process exited (it exits when the queue is empty)."
  echo
  echo "## The raw SQL limit"
  echo
  echo "pgbench, ${RAW_SECONDS} s per row, on a bare table of 400,000 queued rows: each transaction claims 10"
  echo "(\`FOR UPDATE SKIP LOCKED\`, one statement and commit) and completes them (one statement and"
  echo "commit), with no tenants, leases, fencing, payloads or triggers (\`bench/pgbench/\`)."
  echo
  echo "| pgbench clients | jobs/s |"
  echo "|---|---|"
  printf '%s' "$RAW"
  echo
  echo "## Scale check: claim latency at 100,000 queued over 1,000 and 10,000 tenants, 400,000 in one"
  echo
  echo "Jobs spread evenly over the tenants; one job in 200 is scheduled a day ahead (queued, not"
  echo "runnable), the rest have \`run_at\` spread over the last hour. What is timed is \`Worker::claim\`"
  echo "of 16 (per-tenant cap 4): one \`queue_claim\` statement and its commit, on one connection whose"
  echo "first call (statement preparation, function compilation) is not timed. Before each claim the"
  echo "previous claim's jobs are written as succeeded, untimed (a worker writes them in the same call"
  echo "as its next claim; the drain figures above include that). At"
  echo "each depth 500 claims are timed (fewer at the last depth, where the jobs run out); between"
  echo "depths the oldest runnable jobs are marked succeeded in bulk (as the worker would), then"
  echo "VACUUMed, as autovacuum would have during a real drain of that many jobs (its default"
  echo "threshold is a fifth of the table), because draining them 16 at a time takes many minutes here."
  echo "A CHECKPOINT after the setup and after each fast-forward writes their dirty pages out before"
  echo "the timed claims, so that the claims do not pay for the setup's (or an earlier phase's) writes."
  echo "The dead tuples the timed calls leave are left to autovacuum. Scale phase (1,000 tenants): ${ELAPSED} s."
  echo
  for part in "100,000 jobs over 1,000 tenants:$CLAIMS" "100,000 jobs over 10,000 tenants:$SCALE_10K" "400,000 jobs in 1 tenant:$SCALE_ONE"; do
    echo "**${part%%:*}**"
    echo
    echo "| queued jobs | tenants with queued jobs | claims | jobs claimed | p50 ms | p90 ms | p99 ms | max ms | dead tuples (pg_stat) |"
    echo "|---|---|---|---|---|---|---|---|---|"
    echo "${part#*:}"
    echo
  done
  echo "**The machine's floor**: a one-row \`UPDATE\` and its commit, timed the same way (500 times, one"
  echo "warm connection) at the start of each scale run. No claim, which commits more rows, can have a"
  echo "shorter tail than this on the same machine at the same moment."
  echo
  echo "| when | p50 ms | p90 ms | p99 ms | max ms |"
  echo "|---|---|---|---|---|"
  echo "$FLOOR"
  echo
  echo "Median claim at 100,000 queued over 1,000 tenants: ${P50_FULL} ms; at 1,000 queued: ${P50_LOW} ms."
  echo
  echo "## Reading"
  echo
  echo "- **The claim's work is O(batch)**: \`queue_claim\` (migration 0016) reads at most 16"
  echo "  tenants from \`queue_tenants\` (the partial index on \`next_run_at\`; tenants at their cap"
  echo "  are at most running / cap entries to skip), then each one's oldest runnable jobs up to its"
  echo "  free slots from \`jobs_queued_by_tenant\`: ≤ 16 × cap candidates, whatever the number of"
  echo "  tenants or the depth. See the plans below. JIT is off for the function."
  echo "- No trigger code runs when a job is claimed or completes: \`queue_tenants.next_run_at\` is a"
  echo "  lower bound that only jobs entering the queue lower, and the claim sets it right for the"
  echo "  tenants it visits."
  echo "- A busy worker claims once half its slots are free (or 5 ms after the first frees), with up"
  echo "  to two batch calls under way, and each call writes the outcomes of the runs that ended"
  echo "  (succeeded or rescheduled) in the same statement: one round trip and one commit per batch."
  echo "- graphile-worker has no per-tenant fairness; mailscope keeps it (per-tenant cap across"
  echo "  workers, held by the tenant row's lock during the claim)."
  echo "- Enqueue: one INSERT per call is bound by a commit (fsync, \`synchronous_commit=on\`) per"
  echo "  job; \`queue::enqueue_many\` and graphile-worker's \`addJobs\` send 100 jobs in one statement."
  echo
  echo "### The claim's statements at 100,000 queued (auto_explain, ANALYZE and BUFFERS, rolled back)"
  echo
  echo '```'
  echo "$PLAN"
  echo '```'
} >"$result"
echo "wrote $result" >&2
