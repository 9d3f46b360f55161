#!/usr/bin/env bash
# Builds .venv from a Python 3.11 and installs rexnet-serving into it (editable).
# Python 3.11: the newest minor version every pinned wheel exists for (Paddle 2.6.2, paddle2onnx, onnx,
# onnxruntime; see README "Python version"). Paddle Serving 0.9.0 goes in without its metadata's pins
# (scripts/no-deps-requirements.txt), its cp39-tagged client through scripts/serving_client_wheel.py.
# Idempotent: when setup.py, this script and the device are unchanged it returns at once.
#   REXNET_DEVICE=cpu|gpu   which Paddle builds to install (default cpu)
#   REXNET_PYTHON=/path     use this interpreter (must be 3.11)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
device="${REXNET_DEVICE:-cpu}"
case "$device" in cpu|gpu) ;; *) echo "bootstrap: REXNET_DEVICE must be cpu or gpu, not '$device'" >&2; exit 2;; esac

is_py311() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }

find_python311() {
  local c v
  for c in "${REXNET_PYTHON:-}" "$(command -v python3.11 || true)" "$(command -v python3 || true)"; do
    if is_py311 "$c"; then echo "$c"; return 0; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.11(\.[0-9]+)?$' | sort -t. -k3 -n -r); do
      c="$(pyenv root)/versions/$v/bin/python3.11"
      if is_py311 "$c"; then echo "$c"; return 0; fi
    done
  fi
  if command -v uv >/dev/null 2>&1; then
    c=$(uv python find 3.11 2>/dev/null || true)
    if is_py311 "$c"; then echo "$c"; return 0; fi
  fi
  return 1
}

stamp_of() { cat "$root/setup.py" "${BASH_SOURCE[0]}" "$root/scripts/no-deps-requirements.txt" \
  "$root/scripts/serving_client_wheel.py" | sha256sum | cut -d' ' -f1 | sed "s/\$/-$device/"; }
stamp_file="$venv/.rexnet-installed"
want=$(stamp_of)
if [ -x "$venv/bin/python" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ] \
   && [ -f "$root/rexnet_serving/oip/proto/inference_v2.desc" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ] || ! is_py311 "$venv/bin/python"; then
  if ! py=$(find_python311); then
    cat >&2 <<'MSG'
bootstrap: no Python 3.11 found (looked at $REXNET_PYTHON, python3.11 and python3 on PATH, pyenv, uv).
rexnet-serving's pinned stack (Paddle 2.6.2, Paddle Serving 0.9.0) runs on Python 3.11. Install one:
  pyenv install 3.11.7        or    uv python install 3.11
then run this again (or point REXNET_PYTHON at it).
MSG
    exit 3
  fi
  echo "bootstrap: creating .venv with $py"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade "pip>=23" "setuptools>=64,<81" wheel
fi

echo "bootstrap: installing rexnet-serving[$device] into .venv"
"$venv/bin/python" -m pip install -q -e "$root[$device,test]"
# Pins that go in without their metadata's dependencies (why: in that file).
"$venv/bin/python" -m pip install -q --no-deps -r "$root/scripts/no-deps-requirements.txt"
# Paddle Serving's client: the pinned cp39 wheel, sha256-checked, repacked as py3 without its C++ client.
"$venv/bin/python" "$root/scripts/serving_client_wheel.py"
# The Open Inference Protocol's gRPC definitions, from the kserve package (see that script).
"$venv/bin/python" "$root/scripts/oip_descriptor.py"
echo "$want" > "$stamp_file"
