"""The Kubernetes manifests (k8s/) and images (docker/) checked against the service they deploy.

The rendered manifests (`kubectl kustomize`, as `kubectl apply -k` renders them) are read and compared
with the service itself: ports with rexnet_serving.defaults and the config loader's resolved values,
probe paths with the ones the service serves, mounts with the paths the container commands read, time
budgets with the config's drain and startup timeouts. The initContainer's model fetcher
(docker/fetch_archive.py) runs against file:// and a local HTTP server; finally the Deployment's own
command line starts the service locally and must turn ready, then exit 0 on SIGTERM.
The schema and checkov scans are scripts/validate_k8s.sh (test_validate_script, slow).
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests
import yaml

import rexnet_serving
from rexnet_serving import defaults
from conftest import REPO_ROOT, free_port

K8S = REPO_ROOT / "k8s"
DOCKER = REPO_ROOT / "docker"
CONFIGS = REPO_ROOT / "serving_configs"
FETCH = DOCKER / "fetch_archive.py"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
GPU_OVERLAYS = [name for name in OVERLAYS if name.startswith("gpu")]
VENV_BIN = Path(sys.executable).parent
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl renders the kustomizations (apt-get install kubectl)")


# ---------------------------------------------------------------- rendering and lookups


@pytest.fixture(autouse=True)
def _outside_the_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Importing Paddle Serving's pipeline (the config loader's final check) writes logs into the cwd.
    monkeypatch.chdir(tmp_path)


@functools.lru_cache(maxsize=None)
def _render(path: str) -> tuple:
    proc = subprocess.run([KUBECTL, "kustomize", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def rendered(overlay: str) -> List[Dict[str, Any]]:
    return list(_render(str(K8S / "overlays" / overlay)))


def find(docs: List[Dict[str, Any]], kind: str, name: Optional[str] = None) -> Dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def deployment(docs: List[Dict[str, Any]]) -> Dict[str, Any]:
    return find(docs, "Deployment", "rexnet-serving")


def container(pod_spec: Dict[str, Any], name: str, init: bool = False) -> Dict[str, Any]:
    items = pod_spec["initContainers" if init else "containers"]
    hits = [c for c in items if c["name"] == name]
    assert len(hits) == 1, f"no container {name!r} in {[c['name'] for c in items]}"
    return hits[0]


def serving(docs: List[Dict[str, Any]]) -> Dict[str, Any]:
    return container(deployment(docs)["spec"]["template"]["spec"], "serving")


def flag(args: List[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def config_map(docs: List[Dict[str, Any]], pod_spec: Dict[str, Any], volume_name: str) -> Dict[str, str]:
    volume = next(v for v in pod_spec["volumes"] if v["name"] == volume_name)
    return find(docs, "ConfigMap", volume["configMap"]["name"])["data"]


def mount_for(c: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The volumeMount of container ``c`` that holds ``path`` (the deepest one)."""
    mounts = [m for m in c.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume of container {c['name']} (the root filesystem is read-only)"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def resolved_config(overlay: str, tmp_path: Path, cpus: Any = None):
    """The service's own loader on the config the serving container reads, as the pod would see it
    (``cpus``: a rexnet_serving.cpus.CpuBudget standing in for the pod's; default: this machine's)."""
    from rexnet_pipelines.config import load_config
    docs = rendered(overlay)
    pod = deployment(docs)["spec"]["template"]["spec"]
    args = serving(docs)["args"]
    config_path = flag(args, "--config")
    mount = mount_for(serving(docs), config_path)
    local = tmp_path / overlay / "config"
    local.mkdir(parents=True)
    for key, text in config_map(docs, pod, mount["name"]).items():
        (local / key).write_text(text)
    return load_config(local / Path(config_path).relative_to(mount["mountPath"]), cpus=cpus)


def probe_window(probe: Dict[str, Any]) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def pod_specs(docs: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield d["spec"]["template"]["spec"]


# ---------------------------------------------------------------- manifests vs the service


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_are_the_service_defaults(overlay: str, tmp_path: Path) -> None:
    config = resolved_config(overlay, tmp_path)
    expected = {"http": defaults.HTTP_PORT, "grpc": defaults.GRPC_PORT, "metrics": defaults.METRICS_PORT,
                "v2-http": defaults.OIP_HTTP_PORT, "v2-grpc": defaults.OIP_GRPC_PORT}
    assert (config.http_port, config.rpc_port, config.metrics_port, config.rexnet["oip_http_port"],
            config.rexnet["oip_grpc_port"]) == tuple(expected.values())
    docs = rendered(overlay)
    ports = {p["name"]: p["containerPort"] for p in serving(docs)["ports"]}
    assert ports == expected
    for service_name in ("rexnet-serving", "rexnet-serving-headless"):
        service = find(docs, "Service", service_name)
        for port in service["spec"]["ports"]:
            container_ports = {p["name"]: p["containerPort"] for c in deployment(docs)["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            assert port["targetPort"] == port["name"], "Services target named ports"
            assert port["port"] == container_ports[port["name"]], f"{service_name} {port['name']}"
    assert find(docs, "Service", "rexnet-serving-headless")["spec"]["clusterIP"] == "None"
    template = deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    assert int(template["prometheus.io/port"]) == defaults.METRICS_PORT
    assert template["prometheus.io/path"] == "/metrics"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_the_service_health_endpoints(overlay: str) -> None:
    c = serving(rendered(overlay))
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    from rexnet_pipelines import health
    source = Path(health.__file__).read_text()
    for path in ("/readyz", "/healthz", "/metrics"):
        assert f'path == "{path}"' in source, f"the service no longer routes {path}"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_time_budgets_cover_the_service_timeouts(overlay: str, tmp_path: Path) -> None:
    config = resolved_config(overlay, tmp_path)
    docs = rendered(overlay)
    pod = deployment(docs)["spec"]["template"]["spec"]
    c = serving(docs)
    startup = probe_window(c["startupProbe"])
    assert startup >= config.rexnet["startup_timeout_s"], "the kubelet would kill a start the service still allows"
    if overlay in GPU_OVERLAYS:
        assert startup >= 600, "GPU start-up (CUDA init, warm-up, TensorRT builds) needs >= 10 min"
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + config.rexnet["drain_timeout_s"] + 5
    assert deployment(docs)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mounts_are_the_paths_the_commands_read(overlay: str) -> None:
    docs = rendered(overlay)
    pod = deployment(docs)["spec"]["template"]["spec"]
    c = serving(docs)
    args = c["args"]
    config_path = flag(args, "--config")
    config_mount = mount_for(c, config_path)
    assert config_mount.get("readOnly") is True
    assert Path(config_path).name in config_map(docs, pod, config_mount["name"])
    model_dir = flag(args, "--model-dir")
    assert mount_for(c, model_dir).get("readOnly") is True, "the serving container must not write its model"
    fetch = container(pod, "fetch-model", init=True)
    assert flag(fetch["args"], "--dest") == model_dir
    fetch_mount = mount_for(fetch, model_dir)
    assert fetch_mount["name"] == mount_for(c, model_dir)["name"] and not fetch_mount.get("readOnly")
    workdir = flag(args, "--workdir")
    volume = next(v for v in pod["volumes"] if v["name"] == mount_for(c, workdir)["name"])
    assert "emptyDir" in volume and not mount_for(c, workdir).get("readOnly")
    # every argument names a flag the service knows
    from rexnet_pipelines.cli import build_parser
    build_parser().parse_args(args)
    assert c["command"] == ["rexnet-serve"]


@needs_kubectl
def test_config_map_is_serving_configs_byte_for_byte() -> None:
    docs = rendered("cpu")
    data = config_map(docs, deployment(docs)["spec"]["template"]["spec"], "config")
    files = sorted(p.name for p in CONFIGS.glob("*.yml"))
    assert files, "serving_configs/ has no config files"
    missing = [name for name in files if name not in data]
    assert not missing, f"serving_configs/Kustomization does not list {missing}"
    for name in files:
        assert data[name] == (CONFIGS / name).read_text(), f"{name} differs from serving_configs/{name}"


@needs_kubectl
def test_overlays_select_their_device() -> None:
    expected = {"cpu": ("cpu", 0), "cpu-brpc": ("cpu", 0), "gpu": ("gpu", 1), "gpu-trt": ("gpu", 2)}
    assert set(OVERLAYS) == set(expected), "a new overlay needs its expected device here"
    import tempfile
    for overlay, (device, device_type) in expected.items():
        with tempfile.TemporaryDirectory() as tmp:
            config = resolved_config(overlay, Path(tmp))
        assert (config.inference.device, config.infer_service["device_type"]) == (device, device_type), overlay
        resources = serving(rendered(overlay))["resources"]
        pod = deployment(rendered(overlay))["spec"]["template"]["spec"]
        if device == "gpu":
            assert resources["limits"]["nvidia.com/gpu"] == 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert pod["nodeSelector"]
        else:
            assert "nvidia.com/gpu" not in resources["limits"] and "tolerations" not in pod


@needs_kubectl
def test_cpu_request_equals_limit_and_the_derived_threads_fit_it(tmp_path: Path) -> None:
    """The service sizes its threads from the CPU limit (the cgroup quota): the pod must be guaranteed
    those CPUs, and the math threads derived from them must fit in them."""
    from rexnet_serving.cpus import CGROUP, CpuBudget
    for overlay in OVERLAYS:
        resources = serving(rendered(overlay))["resources"]
        request, limit = str(resources["requests"]["cpu"]), str(resources["limits"]["cpu"])
        assert request == limit and limit.isdigit(), f"{overlay}: cpu request {request} != limit {limit} (whole CPUs)"
        cpus = int(limit)
        config = resolved_config(overlay, tmp_path / "sized", CpuBudget(cpus, CGROUP, float(cpus)))
        sizing = config.sizing
        assert str(sizing.cpus) == f"cpus {cpus} (cgroup quota)"
        if config.inference.device == "cpu" and not config.inference.remote:
            assert sizing.infer_streams * sizing.infer_threads <= cpus, (overlay, sizing)
        assert sizing.prepare_workers <= cpus, (overlay, sizing)


@needs_kubectl
@pytest.mark.parametrize("target", OVERLAYS + ["../batch", "../batch-indexed", "../batch-indexed/gpu"])
def test_pods_are_locked_down(target: str) -> None:
    docs = list(_render(str((K8S / "overlays" / target).resolve())))
    uids = {int(m.group(1)) for f in DOCKER.glob("Dockerfile.*") if not f.name.endswith(".dockerignore")
            for m in re.finditer(r"^USER (\d+):\d+$", f.read_text(), re.M)}
    assert len(uids) == 1, f"the Dockerfiles' USER lines disagree: {uids}"
    (uid,) = uids
    for pod in pod_specs(docs):
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == uid
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']} {kind}"
            assert re.search(r":\d+\.\d+\.\d+-", c["image"]), f"{c['name']}: image {c['image']} not a release tag"
        for volume in pod["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"emptyDir {volume['name']} without sizeLimit"
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "rexnet-serving", d["kind"]
        assert labels["app.kubernetes.io/version"] == rexnet_serving.__version__, d["kind"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policies_target_the_pods(overlay: str) -> None:
    docs = rendered(overlay)
    dep = deployment(docs)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    policy = find(docs, "NetworkPolicy", "rexnet-serving")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == port_names
    pdb = find(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa_file = (K8S / "base" / "hpa.yaml").read_text()
    from rexnet_pipelines import metrics
    assert f"name: {metrics.IN_FLIGHT._name}" in hpa_file, "the custom-metric variant names a gauge the service lacks"
    hpa = find(docs, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == ("Deployment", "rexnet-serving")
    assert hpa["minReplicas"] >= 2, "with one replica the PodDisruptionBudget blocks every node drain"
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()


@needs_kubectl
def test_brpc_sidecar_speaks_the_backend_cli(tmp_path: Path) -> None:
    docs = rendered("cpu-brpc")
    pod = deployment(docs)["spec"]["template"]["spec"]
    brpc = container(pod, "brpc")
    from rexnet_serving.brpc.cli import build_parser
    args = build_parser().parse_args(brpc["args"])
    assert brpc["command"] == ["rexnet-brpc"] and args.command == "cpp"
    assert args.port == defaults.BRPC_PORT == {p["name"]: p["containerPort"] for p in brpc["ports"]}["brpc"]
    assert str(args.model_dir) == flag(serving(docs)["args"], "--model-dir")
    assert mount_for(brpc, str(args.model_dir)).get("readOnly") is True
    assert not mount_for(brpc, str(args.workdir)).get("readOnly")
    for name in ("rexnet-serving", "rexnet-serving-headless"):
        ports = {p["name"]: p["port"] for p in find(docs, "Service", name)["spec"]["ports"]}
        assert ports["brpc"] == defaults.BRPC_PORT
    # the Pipeline beside it forwards inference to the sidecar's port
    config = resolved_config("cpu-brpc", tmp_path)
    assert config.inference.remote and config.infer["server_endpoints"] == [f"127.0.0.1:{args.port}"]
    # the CPU overlay without the component exposes no bRPC port anywhere
    assert all(p["name"] != "brpc" for d in rendered("cpu") if d["kind"] == "Service" for p in d["spec"]["ports"])


@needs_kubectl
def test_batch_job_calls_the_service() -> None:
    docs = list(_render(str(K8S / "batch")))
    job = find(docs, "Job", "rexnet-batch")
    pod = job["spec"]["template"]["spec"]
    c = container(pod, "batch")
    from rexnet_serving.clients.batch import build_parser
    args = build_parser().parse_args(c["args"])
    host, port = args.address.rsplit(":", 1)
    service = find(rendered("cpu"), "Service", "rexnet-serving")
    assert host == service["metadata"]["name"] and (args.protocol, int(port)) == ("http", defaults.HTTP_PORT)
    for source in args.sources:
        assert mount_for(c, source).get("readOnly") is True
    assert not mount_for(c, args.output).get("readOnly")
    assert pod["restartPolicy"] == "Never" and job["spec"]["ttlSecondsAfterFinished"] > 0


def indexed(variant: str = "") -> List[Dict[str, Any]]:
    return list(_render(str(K8S / "batch-indexed" / variant)))


def run_config(docs: List[Dict[str, Any]], c: Dict[str, Any]) -> Dict[str, str]:
    """The environment a container gets from its envFrom ConfigMaps and literal env values."""
    env: Dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


@needs_kubectl
@pytest.mark.parametrize("variant", ["", "gpu"])
def test_indexed_job_shards_and_failure_policy(variant: str) -> None:
    from rexnet_serving.predict_cli import build_parser
    from rexnet_serving.runs import merge, shards, summary
    docs = indexed(variant)
    job = find(docs, "Job", "rexnet-predict-shards")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    c = container(pod, "predict")
    env = run_config(docs, c)
    assert spec["completionMode"] == "Indexed" and pod["restartPolicy"] == "Never"
    assert int(env[shards.COUNT_ENV]) == spec["completions"] >= spec["parallelism"] >= 1
    assert spec["backoffLimitPerIndex"] >= 1 and spec["ttlSecondsAfterFinished"] > 0
    rules = {r["action"]: r for r in spec["podFailurePolicy"]["rules"]}
    assert rules["FailJob"]["onExitCodes"] == {"containerName": "predict", "operator": "In",
                                               "values": [summary.EXIT_USAGE]}
    assert rules["FailIndex"]["onExitCodes"]["values"] == [summary.EXIT_FAILED]  # bad input: not retried
    assert rules["Ignore"]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert summary.EXIT_COMMIT not in sum((r.get("onExitCodes", {}).get("values", []) for r in rules.values()),
                                          []), "a failed upload must be retried (backoffLimitPerIndex)"
    args = build_parser().parse_args(_expand(c["args"], env))  # every $(VAR) set, every flag known
    assert c["command"] == ["rexnet-predict"] and "$(" not in " ".join(_expand(c["args"], env))
    assert args.device == ("gpu" if variant else "cpu") and args.output and args.shard is None
    # the model as the Deployment gets it: the same fetcher, digest-checked, into a read-only mount
    fetch, served = container(pod, "fetch-model", init=True), container(
        deployment(rendered("cpu"))["spec"]["template"]["spec"], "fetch-model", init=True)
    assert fetch["command"] == served["command"] and flag(fetch["args"], "--sha256") == "$(MODEL_SHA256)"
    assert flag(fetch["args"], "--dest") == str(args.model_dir)
    assert mount_for(c, str(args.model_dir)).get("readOnly") is True
    assert {"MODEL_URL", "MODEL_SHA256"} <= set(run_config(docs, fetch))
    # credentials: a Secret mounted read-only as a file, never a value in the manifests
    assert not [d for d in docs if d["kind"] == "Secret"]
    secret = next(v for v in pod["volumes"] if "secret" in v)
    assert secret["secret"]["secretName"] == "rexnet-batch-storage"
    assert mount_for(c, env["AWS_SHARED_CREDENTIALS_FILE"])["name"] == secret["name"]
    assert not re.search(r"(?i)(secret_access_key|access_key_id|password)\s*[:=]", yaml.safe_dump_all(docs))
    assert not mount_for(c, env["REXNET_STAGING_DIR"]).get("readOnly")
    limits = c["resources"]["limits"]
    assert (limits.get("nvidia.com/gpu") == 1) == bool(variant)
    # the merge step: the same run settings, waiting for the shards
    merge_job = find(docs, "Job", "rexnet-predict-merge")
    m = container(merge_job["spec"]["template"]["spec"], "merge")
    margs = merge.build_parser().parse_args(_expand(m["args"], run_config(docs, m))[1:])
    assert m["command"] == ["rexnet-batch"] and m["args"][0] == "merge"
    assert (margs.sources, margs.output, margs.shards) == ([env["INPUT"]], env["OUTPUT"], spec["completions"])
    assert margs.wait < merge_job["spec"]["activeDeadlineSeconds"]
    policy = find(docs, "NetworkPolicy", "rexnet-batch-indexed")["spec"]
    for p in (pod, merge_job["spec"]["template"]["spec"]):
        labels = (job if p is pod else merge_job)["spec"]["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert "ingress" not in policy and set(policy["policyTypes"]) == {"Ingress", "Egress"}


@needs_kubectl
def test_indexed_job_command_runs_each_shard_locally(scored_model_dir: Path, tmp_path: Path) -> None:
    """The Job's own command lines: the initContainer fetches the packed export, each index's pod runs
    rexnet-predict with JOB_COMPLETION_INDEX set, then the merge Job's command finds every image once."""
    from images import encode, photo
    docs = indexed()
    job = find(docs, "Job", "rexnet-predict-shards")
    pod = job["spec"]["template"]["spec"]
    volumes = tmp_path / "volumes"
    archive = tmp_path / "model.tar.gz"
    digest = run_fetch("pack", str(scored_model_dir), "-o", str(archive)).stdout.strip()
    fetch = container(pod, "fetch-model", init=True)
    proc = run_fetch(*_localize(_expand(fetch["args"], {"MODEL_URL": archive.as_uri(), "MODEL_SHA256": digest}),
                                _local_paths(fetch, volumes)))
    assert proc.returncode == 0, proc.stderr

    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        (images / f"{i:02d}.jpg").write_bytes(encode(photo("china", (48 + i, 40)), "jpeg"))
    c = container(pod, "predict")
    mounts = _local_paths(c, volumes)
    env = {name: _localize([value], mounts)[0] for name, value in run_config(docs, c).items()}  # HOME...
    env.update(INPUT=str(images), OUTPUT=str(tmp_path / "results" / "preds.jsonl"))
    for index in range(job["spec"]["completions"]):
        run = subprocess.run([str(VENV_BIN / c["command"][0])] + _expand(_localize(c["args"], mounts), env),
                             env=dict(os.environ, **env, JOB_COMPLETION_INDEX=str(index)),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert f"shard {index}/{job['spec']['completions']}" in run.stderr
    m = container(find(docs, "Job", "rexnet-predict-merge")["spec"]["template"]["spec"], "merge")
    margs = _expand(m["args"], env)
    margs[margs.index("--wait") + 1] = "0"
    merged = subprocess.run([str(VENV_BIN / m["command"][0])] + margs, capture_output=True, text=True,
                            timeout=120)
    assert merged.returncode == 0 and "every input exactly once" in merged.stderr, merged.stderr
    summary = json.loads((tmp_path / "results" / "preds-summary.json").read_text())
    assert summary["records"] == summary["inputs"] == 10 and summary["model"]["name"] == "ReXNet_1_0"


def test_container_commands_are_installed() -> None:
    setup_py = (REPO_ROOT / "setup.py").read_text()
    for script in ("rexnet-serve", "rexnet-brpc", "rexnet-batch", "rexnet-predict"):
        assert re.search(rf'"{script}=', setup_py), f"setup.py has no console script {script}"
        assert (VENV_BIN / script).exists(), f"{script} is not installed in {VENV_BIN} (scripts/bootstrap.sh)"
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DOCKER / dockerfile).read_text()
        assert "docker/fetch_archive.py /opt/rexnet/venv/bin/rexnet-fetch-archive" in text, dockerfile
        # the same no-deps pins as scripts/bootstrap.sh (grpcio over Paddle Serving's pin, paddle-serving-app)
        assert "pip install --no-deps -r /opt/rexnet/src/scripts/no-deps-requirements.txt" in text, dockerfile
        extra = "cpu" if dockerfile.endswith("cpu") else "gpu"
        # s3, parquet: what k8s/batch-indexed's pods read and write (rexnet_serving/runs/storage.py)
        assert f'/opt/rexnet/src[{extra},s3,parquet]"' in text, dockerfile


# ---------------------------------------------------------------- the model fetcher (initContainer)


def run_fetch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FETCH), *args], capture_output=True, text=True, timeout=120)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def model_tree(tmp_path: Path) -> Path:
    """The layout rexnet-export writes, with small stand-in files (the server test uses a real export)."""
    root = tmp_path / "exported"
    for sub in ("inference", "serving_server", "serving_client"):
        (root / sub).mkdir(parents=True)
        (root / sub / "payload.bin").write_bytes(os.urandom(2048))
    (root / "manifest.json").write_text(json.dumps({"arch": "ReXNet_1_0"}))
    (root / "labels.txt").write_text("0 tench\n")
    return root


def tree(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".fetched-sha256"}


def test_fetch_file_url_round_trip_and_restart(model_tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    packed = run_fetch("pack", str(model_tree), "-o", str(archive))
    assert packed.returncode == 0, packed.stderr
    digest = packed.stdout.strip()
    assert digest == sha256_of(archive)
    dest = tmp_path / "models" / "current"
    args = ("fetch", archive.as_uri(), "--sha256", digest, "--dest", str(dest),
            "--require", "manifest.json", "--require", "serving_server")
    first = run_fetch(*args)
    assert first.returncode == 0, first.stderr
    assert tree(dest) == tree(model_tree)
    second = run_fetch(*args)  # an initContainer restart in the same pod
    assert second.returncode == 0 and "already holds" in second.stdout
    assert sorted(p.name for p in dest.parent.iterdir()) == ["current"], "staging left behind"


def test_fetch_accepts_an_archive_with_a_top_directory(model_tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "model.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_tree, arcname="ReXNet_1_0")
    dest = tmp_path / "current"
    proc = run_fetch("fetch", archive.as_uri(), "--sha256", sha256_of(archive), "--dest", str(dest),
                     "--require", "manifest.json")
    assert proc.returncode == 0, proc.stderr
    assert tree(dest) == tree(model_tree)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple]:
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()),
                                             functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_over_http_checks_the_digest(model_tree: Path, tmp_path: Path, http_root: tuple) -> None:
    root, base = http_root
    archive = root / "model.tar.gz"
    digest = run_fetch("pack", str(model_tree), "-o", str(archive)).stdout.strip()
    dest = tmp_path / "current"
    ok = run_fetch("fetch", f"{base}/model.tar.gz", "--sha256", digest, "--dest", str(dest))
    assert ok.returncode == 0, ok.stderr
    assert tree(dest) == tree(model_tree)

    wrong = "0" * 64
    other = tmp_path / "other"
    bad = run_fetch("fetch", f"{base}/model.tar.gz", "--sha256", wrong, "--dest", str(other))
    assert bad.returncode == 1
    assert f"sha256 mismatch: expected {wrong}, got {digest}" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not other.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".other")] == []

    missing = run_fetch("fetch", f"{base}/nope.tar.gz", "--sha256", digest, "--dest", str(other), "--retries", "3")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr and "retry" not in missing.stderr


def test_fetch_refuses_bad_archives_and_input(model_tree: Path, tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        data = b"owned"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    proc = run_fetch("fetch", evil.as_uri(), "--sha256", sha256_of(evil), "--dest", str(tmp_path / "d"))
    assert proc.returncode == 1 and "outside the destination" in proc.stderr
    assert not (tmp_path / "escaped.txt").exists()

    archive = tmp_path / "model.tar.gz"
    digest = run_fetch("pack", str(model_tree / "inference"), "-o", str(archive)).stdout.strip()
    proc = run_fetch("fetch", archive.as_uri(), "--sha256", digest, "--dest", str(tmp_path / "d"),
                     "--require", "manifest.json")
    assert proc.returncode == 1 and "lacks manifest.json" in proc.stderr

    proc = run_fetch("fetch", archive.as_uri(), "--sha256", "set-me", "--dest", str(tmp_path / "d"))
    assert proc.returncode == 2 and "not 64 hex digits" in proc.stderr
    proc = run_fetch("fetch", "ftp://host/model.tar.gz", "--sha256", digest, "--dest", str(tmp_path / "d"))
    assert proc.returncode == 1 and "unsupported URL scheme" in proc.stderr
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- the manifests' command, run locally


def _local_paths(c: Dict[str, Any], root: Path) -> Dict[str, Path]:
    return {m["mountPath"]: root / m["name"] for m in c.get("volumeMounts", [])}


def _localize(args: List[str], mounts: Dict[str, Path]) -> List[str]:
    """Rewrite paths under a mount point to the local directory standing in for that volume."""
    out = []
    for arg in args:
        for mount_path in sorted(mounts, key=len, reverse=True):
            if arg == mount_path or arg.startswith(mount_path.rstrip("/") + "/"):
                arg = str(mounts[mount_path]) + arg[len(mount_path.rstrip("/")):]
                break
        out.append(arg)
    return out


def _expand(args: List[str], env: Dict[str, str]) -> List[str]:
    """$(VAR) references, expanded as the kubelet does."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


@pytest.mark.server
@pytest.mark.slow
@needs_kubectl
def test_deployment_command_serves_and_drains(tmp_path: Path) -> None:
    from rexnet_serving.export import export_model
    docs = rendered("cpu")
    pod = deployment(docs)["spec"]["template"]["spec"]
    volumes = tmp_path / "volumes"

    # the initContainer's own command line fetches a real export, packed as an operator would
    export_model(defaults.DEFAULT_ARCH, tmp_path / "export", class_num=10, input_size=64)
    archive = tmp_path / "model.tar.gz"
    digest = run_fetch("pack", str(tmp_path / "export"), "-o", str(archive)).stdout.strip()
    fetch = container(pod, "fetch-model", init=True)
    fetch_args = _localize(_expand(fetch["args"], {"MODEL_URL": archive.as_uri(), "MODEL_SHA256": digest}),
                           _local_paths(fetch, volumes))
    assert fetch["command"] == ["rexnet-fetch-archive"]
    proc = run_fetch(*fetch_args)
    assert proc.returncode == 0, proc.stderr

    c = serving(docs)
    mounts = _local_paths(c, volumes)
    config_mount = mount_for(c, flag(c["args"], "--config"))
    mounts[config_mount["mountPath"]].mkdir(parents=True)
    for key, text in config_map(docs, pod, config_mount["name"]).items():
        (mounts[config_mount["mountPath"]] / key).write_text(text)
    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    command = [str(VENV_BIN / c["command"][0])] + _localize(c["args"], mounts) + [
        "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
        "--metrics-port", str(ports["metrics"]), "--oip-http-port", "0", "--oip-grpc-port", "0"]
    env = dict(os.environ, **{e["name"]: e["value"] for e in c["env"] if "value" in e})
    env["HOME"] = str(mounts["/tmp"])
    probe = c["readinessProbe"]["httpGet"]
    assert probe["port"] == "metrics"
    ready_url = f"http://127.0.0.1:{ports['metrics']}{probe['path']}"
    live_url = f"http://127.0.0.1:{ports['metrics']}{c['livenessProbe']['httpGet']['path']}"
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + min(probe_window(c["startupProbe"]), 300)
        ready = False
        while time.monotonic() < deadline and server.poll() is None:
            try:
                ready = requests.get(ready_url, timeout=2).status_code == 200
            except requests.ConnectionError:
                pass
            if ready:
                break
            time.sleep(0.5)
        assert ready, f"not ready (exit {server.poll()}):\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
        assert requests.get(live_url, timeout=5).status_code == 200
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=pod["terminationGracePeriodSeconds"])
        assert code == 0, (tmp_path / "serve.log").read_text()[-4000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# ---------------------------------------------------------------- the offline validation script


@pytest.mark.slow
@needs_kubectl
def test_validate_script() -> None:
    """Renders everything, validates strictly against the pinned Kubernetes schemas, runs checkov."""
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "validate_k8s.sh")], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validate_k8s: OK" in proc.stdout
