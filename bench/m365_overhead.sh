#!/usr/bin/env bash
# Overhead of the Microsoft 365 connector per call against a local HTTP server (bench/m365_overhead.rs).
# Usage: bench/m365_overhead.sh [calls]   (default 5000 per scenario; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
M365_BENCH_CALLS="${1:-5000}" cargo bench --bench m365_overhead
