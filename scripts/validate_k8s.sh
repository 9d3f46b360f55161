#!/usr/bin/env bash
# Offline checks of the Kubernetes manifests (k8s/) and the images (docker/):
#   1. `kubectl kustomize` renders every overlay, every component (on top of the cpu overlay), k8s/batch and
#      k8s/batch-indexed (CPU and gpu/);
#   2. every rendered object validates against the Kubernetes JSON schemas of each version in
#      K8S_VERSIONS, strictly (an unknown field fails), with kubernetes-validate;
#   3. checkov (Kubernetes and Dockerfile policies) passes on the rendered manifests and docker/Dockerfile.*;
#      every deliberate skip carries its reason in the manifest or Dockerfile.
# The tools go into their own venv (.venv-k8s, any Python >= 3.9): checkov's dependencies clash with the
# serving stack's pins (protobuf 3.20, grpcio 1.33.2). Built once, reused while the pins below are unchanged.
#   K8S_RENDER_DIR=dir   keep the rendered manifests there (default: a temporary directory)
#   K8S_TOOLS_VENV=dir   the tools' venv (default .venv-k8s at the repository root)
#   K8S_TOOLS_PYTHON=py  interpreter for that venv (default python3)
# Exit codes: 0 all passed, 1 a check failed, 3 a tool is missing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
K8S_VERSIONS="1.29.0 1.37.0"   # oldest still in cloud providers' extended support .. newest bundled
TOOL_PINS="kubernetes-validate==1.37.0 checkov==3.3.30"
venv="${K8S_TOOLS_VENV:-$root/.venv-k8s}"
python="${K8S_TOOLS_PYTHON:-python3}"

if [ -n "${K8S_RENDER_DIR:-}" ]; then
  out="$K8S_RENDER_DIR"; mkdir -p "$out"
else
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
fi

t0=$(date +%s)
step() { echo "validate_k8s: $* ($(( $(date +%s) - t0 )) s)"; }

command -v kubectl >/dev/null 2>&1 || { echo "validate_k8s: kubectl not found (it renders kustomizations: apt-get install kubectl, or any kubectl >= 1.27)" >&2; exit 3; }
step "kubectl $(kubectl version --client 2>/dev/null | sed -n 's/^Client Version: //p'), kustomize $(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')"

# 1. Render. A component cannot be built alone: each is rendered on top of the cpu overlay.
render() {  # name dir
  if ! kubectl kustomize "$2" > "$out/$1.yaml" 2> "$out/$1.err"; then
    echo "validate_k8s: FAIL: kubectl kustomize $2" >&2; cat "$out/$1.err" >&2; exit 1
  fi
  rm -f "$out/$1.err"
}
for dir in "$root"/k8s/overlays/*/; do render "overlay-$(basename "$dir")" "$dir"; done
render batch "$root/k8s/batch"
render batch-indexed "$root/k8s/batch-indexed"
render batch-indexed-gpu "$root/k8s/batch-indexed/gpu"
for dir in "$root"/k8s/components/*/; do
  name=$(basename "$dir"); mkdir -p "$out/with-$name"
  # kustomize refuses absolute paths here, hence relative ones.
  printf 'resources:\n  - %s\ncomponents:\n  - %s\n' \
    "$(realpath --relative-to="$out/with-$name" "$root/k8s/overlays/cpu")" \
    "$(realpath --relative-to="$out/with-$name" "$dir")" > "$out/with-$name/kustomization.yaml"
  render "component-$name" "$out/with-$name"
done
rendered=("$out"/*.yaml)
step "rendered ${#rendered[@]} kustomizations into $out"

# 2 and 3 need the tools' venv.
stamp="$venv/.rexnet-pins"
if [ ! -x "$venv/bin/checkov" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$TOOL_PINS" ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null \
    || { echo "validate_k8s: $python is not a Python >= 3.9 (set K8S_TOOLS_PYTHON)" >&2; exit 3; }
  step "installing $TOOL_PINS into $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # shellcheck disable=SC2086
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check $TOOL_PINS > "$out/pip.log" 2>&1; then
    cat "$out/pip.log" >&2; echo "validate_k8s: installing the tools failed" >&2; exit 3
  fi
  echo "$TOOL_PINS" > "$stamp"
fi

for version in $K8S_VERSIONS; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${rendered[@]}" \
    || { echo "validate_k8s: FAIL: schemas of Kubernetes $version (strict)" >&2; exit 1; }
done
step "kubernetes-validate $("$venv/bin/kubernetes-validate" --version 2>&1 | tail -1): every object valid for Kubernetes ${K8S_VERSIONS// /, } (strict)"

# --skip-download: no Prisma Cloud look-ups (guidelines, severities), so the scan is the same offline.
checkov_run() {
  "$venv/bin/checkov" --skip-download --compact --quiet "$@" > "$out/checkov.log" 2>&1 && return 0
  cat "$out/checkov.log" >&2; return 1
}
checkov_run --framework kubernetes $(printf -- '-f %s ' "${rendered[@]}") \
  || { echo "validate_k8s: FAIL: checkov (kubernetes)" >&2; exit 1; }
checkov_run --framework dockerfile -f "$root/docker/Dockerfile.cpu" -f "$root/docker/Dockerfile.gpu" \
  || { echo "validate_k8s: FAIL: checkov (dockerfile)" >&2; exit 1; }
step "checkov $("$venv/bin/checkov" --version): kubernetes and dockerfile checks passed"
echo "validate_k8s: OK in $(( $(date +%s) - t0 )) s"
