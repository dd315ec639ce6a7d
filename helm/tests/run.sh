#!/usr/bin/env bash
# Renders, lints and validates the Helm chart, and with a mailscope binary ties the chart's
# commands, flags and environment variable names to it. CI calls:
#   bash helm/tests/run.sh target/release/mailscope
# Without a binary the binary checks are reported as skipped. More options go to check_chart.py,
# e.g. --database-url postgres://postgres@127.0.0.1:5432/mailscope_helm for the probe smoke run.
# Needs python3 (3.10+) and PyPI once; the virtualenv is cached and rebuilt when the pins change.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${MAILSCOPE_HELM_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/mailscope-helm-venv}"
requirements="$here/requirements.txt"

args=()
if [[ $# -gt 0 && "$1" != -* ]]; then
  args+=(--binary "$1")
  shift
fi
args+=("$@")

stamp="$(sha256sum "$requirements" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version)' | head -n1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.mailscope-stamp" 2>/dev/null)" != "$stamp" ]]; then
  echo "Setting up $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --only-binary=:all: -r "$requirements"
  echo "$stamp" > "$venv/.mailscope-stamp"
fi

exec "$venv/bin/python" "$here/check_chart.py" ${args[@]+"${args[@]}"}
