"""k8s/kserve/: the KServe ServingRuntime and InferenceServices, rendered with `kubectl kustomize`,
validated strictly against KServe's API types (scripts/validate_kserve.py with the test extra's kserve
package, in a child process), and checked against the service: the runtime's command line
parses with rexnet-serve's own parser, its ports are rexnet_serving.defaults', its probes are v2
health routes, and the security settings are the Deployment's."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from conftest import REPO_ROOT, tool_python
from rexnet_serving import defaults

KSERVE = REPO_ROOT / "k8s" / "kserve"
GRPC_ISVC = KSERVE / "inferenceservice-grpc.yaml"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl renders the kustomization (apt-get install kubectl)")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if KUBECTL is None:
        pytest.skip("kubectl renders the kustomization (apt-get install kubectl)")
    proc = subprocess.run([KUBECTL, "kustomize", str(KSERVE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path_factory.mktemp("kserve") / "rendered.yaml"
    path.write_text(proc.stdout)
    return path


def docs_of(path: Path) -> List[Dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(docs: List[Dict[str, Any]], kind: str) -> Dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind]
    assert len(hits) == 1, f"expected one {kind}, found {len(hits)}"
    return hits[0]


@pytest.mark.slow
def test_valid_against_kserve_types(rendered: Path, tmp_path: Path) -> None:
    python = tool_python()
    script = str(REPO_ROOT / "scripts" / "validate_kserve.py")
    proc = subprocess.run([python, script, str(rendered), str(GRPC_ISVC)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "3 objects valid" in proc.stdout
    # The check can fail: a misspelt field deep inside, and a wrong type.
    broken = docs_of(GRPC_ISVC)[0]
    broken["spec"]["predictor"]["model"]["storageURI"] = broken["spec"]["predictor"]["model"].pop("storageUri")
    broken["spec"]["predictor"]["model"]["ports"][0]["containerPort"] = "8001"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    proc = subprocess.run([python, script, str(tmp_path / "broken.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "spec.predictor.model.storageURI: unknown field (not in V1beta1ModelSpec)" in proc.stdout
    assert "ports[0].containerPort: expected int" in proc.stdout


def test_runtime_command_line_parses_with_the_cli(rendered: Path) -> None:
    from rexnet_pipelines.cli import build_parser
    container = one(docs_of(rendered), "ServingRuntime")["spec"]["containers"][0]
    assert container["name"] == "kserve-container" and container["command"] == ["rexnet-serve"]
    args = build_parser().parse_args(container["args"])
    assert args.model_repository == Path("/mnt/models") and args.model_dir is None  # KServe's model mount
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(container["args"] + ["--model-dir", "/models/current"])


def test_ports_probes_and_protocol(rendered: Path) -> None:
    docs = docs_of(rendered)
    runtime = one(docs, "ServingRuntime")["spec"]
    container = runtime["containers"][0]
    assert container["ports"] == [{"name": "http1", "containerPort": defaults.OIP_HTTP_PORT, "protocol": "TCP"}]
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": defaults.OIP_HTTP_PORT}
    assert runtime["annotations"]["prometheus.kserve.io/port"] == str(defaults.METRICS_PORT)
    assert set(runtime["protocolVersions"]) == {"v2", "grpc-v2"}
    grpc_model = docs_of(GRPC_ISVC)[0]["spec"]["predictor"]["model"]
    assert grpc_model["ports"] == [{"name": "h2c", "containerPort": defaults.OIP_GRPC_PORT, "protocol": "TCP"}]
    fmt = runtime["supportedModelFormats"][0]
    from rexnet_serving.manifest import FORMAT_VERSION
    for isvc in (one(docs, "InferenceService"), docs_of(GRPC_ISVC)[0]):
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == one(docs, "ServingRuntime")["metadata"]["name"]
        assert model["modelFormat"] == {"name": fmt["name"], "version": fmt["version"]} == \
            {"name": "rexnet", "version": str(FORMAT_VERSION)}


def test_security_settings_are_the_deployments(rendered: Path) -> None:
    if KUBECTL is None:
        pytest.skip("kubectl")
    proc = subprocess.run([KUBECTL, "kustomize", str(REPO_ROOT / "k8s" / "overlays" / "cpu")], capture_output=True,
                          text=True, timeout=120)
    deployment = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    serving = [c for c in pod["containers"] if c["name"] == "serving"][0]
    docs = docs_of(rendered)
    runtime = one(docs, "ServingRuntime")["spec"]
    container = runtime["containers"][0]
    for key, value in serving["securityContext"].items():
        assert container["securityContext"][key] == value, key
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsUser"] == pod["securityContext"]["runAsUser"]
    assert container["resources"] == serving["resources"]
    for isvc in (one(docs, "InferenceService"), docs_of(GRPC_ISVC)[0]):
        predictor = isvc["spec"]["predictor"]
        assert predictor["securityContext"] == pod["securityContext"]
        assert predictor["automountServiceAccountToken"] is False
    for volume in runtime["volumes"]:
        assert volume["emptyDir"]["sizeLimit"]
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "rexnet-serving"
        assert doc["metadata"]["namespace"] == "rexnet"
