#!/usr/bin/env bash
# The Open Inference Protocol tools' venv (.venv-oip): the official tritonclient (HTTP and gRPC), which
# the tests run against the service's v2 endpoints, and the kserve package, whose API types the KServe
# manifests (k8s/kserve/) are validated against. Their own venv, on any Python >= 3.10, because
# tritonclient[grpc] and kserve need a newer grpcio/protobuf than the serving stack's pins (protobuf 3.20).
# Built once; a second run returns at once while the pins below are unchanged. Prints the venv's python.
#   OIP_TOOLS_VENV=dir   the venv (default .venv-oip at the repository root)
#   OIP_TOOLS_PYTHON=py  interpreter for it (default python3)
# Exit codes: 0 ready, 3 no suitable Python or the install failed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOL_PINS="tritonclient[http,grpc]==2.63.0 kserve==0.16.0"
venv="${OIP_TOOLS_VENV:-$root/.venv-oip}"
python="${OIP_TOOLS_PYTHON:-python3}"
stamp="$venv/.rexnet-pins"

if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$TOOL_PINS" ]; then
  echo "$venv/bin/python"; exit 0
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || { echo "oip_tools: $python is not a Python >= 3.10 (set OIP_TOOLS_PYTHON)" >&2; exit 3; }
echo "oip_tools: installing $TOOL_PINS into $venv" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
log=$(mktemp)
# shellcheck disable=SC2086
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check $TOOL_PINS > "$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; echo "oip_tools: installing the tools failed" >&2; exit 3
fi
rm -f "$log"
echo "$TOOL_PINS" > "$stamp"
echo "$venv/bin/python"
