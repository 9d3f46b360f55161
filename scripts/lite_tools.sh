#!/usr/bin/env bash
# The Paddle Lite venv (.venv-lite): paddlelite 2.13rc0 (the newest on PyPI) and NumPy, on a Python 3.10,
# for `rexnet-export --lite`, whose opt and predictor run in a child process on $REXNET_LITE_PYTHON
# (rexnet_serving/export/lite_format.py). Its own venv because paddlelite has no wheels for Python 3.11,
# the project's interpreter. Built once; a second run returns at once while the pins are unchanged.
# Prints the venv's python (what REXNET_LITE_PYTHON should be).
#   LITE_TOOLS_VENV=dir   the venv (default .venv-lite at the repository root)
#   LITE_TOOLS_PYTHON=py  a Python 3.10 for it (default: python3.10 on PATH, then pyenv's newest 3.10)
# Exit codes: 0 ready, 3 no Python 3.10 or the install failed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PINS="paddlelite==2.13rc0 numpy==1.26.4"
venv="${LITE_TOOLS_VENV:-$root/.venv-lite}"
stamp="$venv/.rexnet-pins"

if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$PINS" ]; then
  echo "$venv/bin/python"; exit 0
fi
is_py310() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; }
python=""
candidates=("${LITE_TOOLS_PYTHON:-}" "$(command -v python3.10 || true)")
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.10(\.[0-9]+)?$' | sort -t. -k3 -n -r); do
    candidates+=("$(pyenv root)/versions/$v/bin/python3.10")
  done
fi
for c in "${candidates[@]}"; do
  if is_py310 "$c"; then python="$c"; break; fi
done
[ -n "$python" ] || { echo "lite_tools: no Python 3.10 found (set LITE_TOOLS_PYTHON; pyenv install 3.10.13)" >&2; exit 3; }
echo "lite_tools: installing $PINS into $venv" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
log=$(mktemp)
# shellcheck disable=SC2086
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: $PINS \
     > "$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; echo "lite_tools: installing Paddle Lite failed" >&2; exit 3
fi
rm -f "$log"
echo "$PINS" > "$stamp"
echo "$venv/bin/python"
