#!/usr/bin/env bash
# Main job: the hardened MedSAMix server (medsamix-server) on the embedded tiny pool and the sample studies.
# Creates/reuses .venv, writes the sample studies to .demo/studies if missing, then runs
#   medsamix-server --studies .demo/studies --host 127.0.0.1 --port 8000
# Environment: PORT (8000), HOST (127.0.0.1; any other address needs a users file: see README "Security"),
# STUDIES (.demo/studies, or a DICOMweb URL such as http://pacs:8042/dicom-web). Extra arguments go to
# medsamix-server (e.g. --conf pool /path/to/pool, --users FILE, --allowed-host NAME; medsamix-server --help).
# The unhardened MONAI Label server still works: monailabel start_server --app apps/medsamix --studies ...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh"
cd "$root"
studies="${STUDIES:-.demo/studies}"
case "$studies" in
  http://*|https://*) ;;  # a DICOMweb server (PACS): nothing to write
  *) if [ ! -d "$studies" ] || [ -z "$(ls -A "$studies" 2>/dev/null | grep -v '^\.' || true)" ]; then
       .venv/bin/python scripts/make_sample_studies.py --out "$studies"
     fi ;;
esac
export PATH="$root/.venv/bin:$PATH"
exec medsamix-server --studies "$studies" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
