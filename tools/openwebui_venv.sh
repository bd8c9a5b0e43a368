#!/usr/bin/env bash
# Open WebUI in a venv of its own, for tools/check_openwebui.py (never .venv: it pulls ~7 GB,
# torch and its CUDA wheels included, through sentence-transformers). Cached: a second run
# with the same version only prints the path.
#
#   bash tools/openwebui_venv.sh            # -> ~/.cache/aivailable/openwebui-venv
#   OPENWEBUI_VENV=/work/owui-venv OPENWEBUI_VERSION=0.12.4 bash tools/openwebui_venv.sh
#
# Not part of `make test` or CI: too heavy for CI's time budget (about 2 minutes and 7 GB
# here from a fast package mirror; much longer from a slow one).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VERSION=${OPENWEBUI_VERSION:-0.12.4}
VENV=${OPENWEBUI_VENV:-${AIVAILABLE_CACHE_DIR:-$HOME/.cache/aivailable}/openwebui-venv}
stamp=$VENV/.installed-open-webui-$VERSION

if [ ! -e "$stamp" ]; then
  # Open WebUI 0.12 wants Python >= 3.11, < 3.13.
  "$PYTHON" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))' || {
    echo "open-webui $VERSION needs Python 3.11 or 3.12; set PYTHON=" >&2
    exit 1
  }
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  start=$(date +%s)
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "open-webui==$VERSION"
  rm -f "$VENV"/.installed-open-webui-*
  touch "$stamp"
  echo "installed open-webui $VERSION in $(($(date +%s) - start)) s ($(du -sh "$VENV" | cut -f1))" >&2
fi
echo "$VENV"
