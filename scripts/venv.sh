#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv in the repository root and install requirements.txt and this
# project into it. Re-installs only when requirements.txt or pyproject.toml changed. Source it or run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x "$venv/bin/python" ]; then
  "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || {
    echo "error: Python 3.11 is required (monailabel 0.8.5 needs distutils/cgi); set PYTHON=/path/to/python3.11" >&2
    exit 1
  }
  "$py" -m venv "$venv"
fi
stamp="$venv/.medsamix-requirements"
want="$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "installing requirements into $venv (first time: several minutes, about 8 GB)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$root/requirements.txt"
  "$venv/bin/python" -m pip install --quiet --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
