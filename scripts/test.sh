#!/usr/bin/env bash
# Set up .venv if needed and run the default test suite (slow tests excluded; add -m slow to run only those).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh"
cd "$root"
exec .venv/bin/python -m pytest -m "not slow" "$@"
