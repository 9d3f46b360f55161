"""Serving config files: a base file plus small per-device files, merged and validated on load.

The keys are Paddle Serving 0.9.0's Pipeline config (pipeline/pipeline_server.py ServerYamlConfChecker:
``http_port``, ``rpc_port``, ``worker_num``, ``dag``, ``op.<name>`` with ``concurrency``, ``timeout``,
``retry``, ``batch_size``, ``auto_batching_timeout`` and ``local_service_conf``, and for the infer op the
remote-op keys ``client_type``, ``server_endpoints``, ``client_config`` and ``fetch_list``) plus
``local_service_conf.runtime`` (Paddle Inference or OpenVINO) and a ``rexnet`` section for what Paddle
Serving lacks (metrics port, drain time, image limits, the bRPC backend's deadline). Paddle Serving
accepts unknown keys silently; here an unknown key or an out-of-range value is an error naming the file
and the key. A file may start with ``extends: other.yml`` (relative to itself): the other file is loaded
first and this one overrides it key by key.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import yaml

from rexnet_serving import defaults
from rexnet_serving.cpus import CpuBudget, Sizing, available_cpus, size_service
from rexnet_serving.runtimes import default_runtime
from rexnet_serving.runtimes.base import PRECISIONS, RUNTIMES, OptionError, check_runtime_options

from .settings import PORT, Field, InferSettings, RexnetSettings, schema_of

CONFIG_DIR = Path(__file__).resolve().parents[1] / "serving_configs"
DEVICE_CONFIGS = {"cpu": CONFIG_DIR / "cpu.yml", "gpu": CONFIG_DIR / "gpu.yml"}
OP_NAMES = ("prepare", "infer")
EXTENDS = "extends"
PathLike = Union[str, Path]


class ConfigError(ValueError):
    """A config file (or flag) that cannot be served: names the file and the key."""


CLIENT_TYPES = ("local_predictor", "brpc")
REMOTE_KEYS = ("client_type", "server_endpoints", "client_config", "fetch_list")


def _ms(value: int) -> bool:  # Paddle Serving's convention for timeouts: -1 (off) or milliseconds > 0
    return value == -1 or value > 0


def _is_endpoint(endpoint: Any) -> bool:
    """A "host:port" string (host may be a bracketed IPv6 address) with a port 1..65535."""
    if not isinstance(endpoint, str):
        return False
    host, sep, port = endpoint.rpartition(":")
    return bool(sep and host.strip("[]") and port.isdigit() and 1 <= int(port) <= 65535)


def _endpoints_ok(value: list) -> bool:
    return all(_is_endpoint(e) for e in value)


def _names_ok(value: Optional[list]) -> bool:
    return value is None or (bool(value) and all(isinstance(v, str) and v for v in value))


AUTO = "auto"  # a sizing key derived at start from the CPUs the process may use (rexnet_serving.cpus)


def _auto_or(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: v == AUTO or (not isinstance(v, str) and low <= v <= high)


_OP_COMMON = {
    "concurrency": Field((int, str), AUTO, _auto_or(1, 64), "1..64 threads, or auto"),
    "timeout": Field(int, -1, _ms, "-1 (none) or milliseconds > 0"),
    "retry": Field(int, 1, lambda v: 1 <= v <= 10, "1..10 attempts"),
}
_INFER = dict(_OP_COMMON, **{
    # Paddle Serving runs a timed op in a new thread per call (func_timeout): it would defeat oneDNN's
    # per-thread caches and can kill a thread inside the predictor.
    "timeout": Field(int, -1, lambda v: v == -1,
                     "-1 (see serving_configs/base.yml; the bRPC backend's deadline is "
                     "rexnet.backend_timeout_s)"),
    "batch_size": Field(int, 1, lambda v: 1 <= v <= 256, "1..256 requests per auto-batch"),
    "auto_batching_timeout": Field(int, -1, _ms, "-1 (off) or milliseconds > 0"),
    # Paddle Serving's remote-op keys. brpc: forward each preprocessed batch to a GeneralModelService
    # (C++ Serving, or rexnet-brpc native) with our pure-Python client, rexnet_serving.runtimes.brpc_remote.
    "client_type": Field(str, "local_predictor", lambda v: v in CLIENT_TYPES, " or ".join(CLIENT_TYPES)),
    "server_endpoints": Field(list, [], _endpoints_ok, 'a list of "host:port" with ports 1..65535'),
    "client_config": Field((str, type(None)), None, lambda v: v is None or bool(v),
                           "a serving_client_conf.prototxt path (null: the model dir's serving_client/)"),
    "fetch_list": Field((list, type(None)), None, _names_ok, "null or a non-empty list of fetch names"),
    "local_service_conf": {
        "model_config": Field((str, type(None)), None, None, ""),
        "device_type": Field(int, 0, lambda v: v in (0, 1, 2), "0 (CPU), 1 (GPU) or 2 (GPU TensorRT)"),
        "devices": Field(str, "", None, ""),
        "thread_num": Field((int, str), AUTO, _auto_or(1, 256), "1..256 threads, or auto"),
        "use_mkldnn": Field(bool, True),
        "precision": Field(str, "fp32", lambda v: v in PRECISIONS, " or ".join(PRECISIONS)),
        # Ours, not Paddle Serving's (left out of what it gets): which runtime runs the model.
        # null: the device's default runtime (rexnet_serving.runtimes.default_runtime, as the offline tools).
        "runtime": Field((str, type(None)), None, lambda v: v is None or v in RUNTIMES,
                         " or ".join(RUNTIMES) + " (null: the device's default)"),
    },
})

SCHEMA: Dict[str, Any] = {
    "http_port": Field((int, type(None)), None, **PORT),
    "rpc_port": Field((int, type(None)), None, **PORT),
    "worker_num": Field(int, 40, lambda v: 1 <= v <= 1024, "1..1024 gRPC threads"),
    "build_dag_each_worker": Field(bool, False, lambda v: v is False,
                                   "false (rexnet-serve runs one DAG in one process)"),
    "dag": {
        "is_thread_op": Field(bool, True, lambda v: v is True,
                              "true (ops pass device tensors as threads of one process)"),
        "retry": Field(int, 1, lambda v: 1 <= v <= 10, "1..10 attempts"),
        "use_profile": Field(bool, False),
        "channel_size": Field(int, 64, lambda v: v >= 0, ">= 0 (0: unbounded; refused below)"),
        "tracer": {"interval_s": Field(int, -1, lambda v: v == -1 or v >= 1, "-1 (off) or seconds >= 1")},
    },
    "op": {"prepare": dict(_OP_COMMON), "infer": _INFER},
    "rexnet": schema_of(RexnetSettings),
}


def _check(data: Any, schema: Mapping[str, Any], source: str, prefix: str = "") -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping, "
                          f"got {type(data).__name__}")
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"{source}: unknown key {name!r} (known here: {known})")
        spec = schema[key]
        if isinstance(spec, dict):
            _check(value, spec, source, name + ".")
            continue
        wrong = spec.problem(value)
        if wrong is not None:
            raise ConfigError(f"{source}: {name} {wrong}")


def _merge(base: Dict[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _defaults(schema: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: _defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


def read_config_file(path: PathLike, _seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """One file and what it extends, merged and checked key by key (no defaults filled in)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the file must be a mapping, got {type(data).__name__}")
    parent = data.pop(EXTENDS, None)
    _check(data, SCHEMA, str(path))
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a file name, got {parent!r}")
    return _merge(read_config_file(path.parent / parent, _seen + (path,)), data)


@dataclass(frozen=True)
class ServingConfig:
    """The merged, validated config: ``paddle`` is what Paddle Serving's PipelineServer gets.

    ``sizing``: the thread counts in ``data`` (``auto`` already replaced) and the CPUs they came from.
    """

    data: Dict[str, Any]
    source: str
    sizing: Sizing

    @property
    def rexnet(self) -> Dict[str, Any]:
        return self.data["rexnet"]

    @cached_property
    def settings(self) -> RexnetSettings:
        """The ``rexnet`` section, typed (``rexnet`` is the checked dict it is built from)."""
        return RexnetSettings.from_config(self.rexnet)

    @property
    def infer_service(self) -> Dict[str, Any]:
        return self.data["op"]["infer"]["local_service_conf"]

    @property
    def infer(self) -> Dict[str, Any]:
        return self.data["op"]["infer"]

    @cached_property
    def inference(self) -> InferSettings:
        """``op.infer``, typed (``infer`` is the checked dict it is built from)."""
        return InferSettings.from_config(self.infer)

    @property
    def http_port(self) -> int:
        return self.data["http_port"]

    @property
    def rpc_port(self) -> int:
        return self.data["rpc_port"]

    @property
    def metrics_port(self) -> int:
        return self.rexnet["metrics_port"]

    def paddle(self) -> Dict[str, Any]:
        """The dict for PipelineServer.prepare_server(yml_dict=...).

        ``model_config`` is left out on purpose: with it, Paddle Serving would load its own
        LocalPredictor beside our predictor (twice the memory on the device); ``runtime`` is ours
        (rexnet_serving.runtimes.load_model), unknown to Paddle Serving. So are the remote-op
        keys: with ``server_endpoints`` Paddle Serving's Op would build paddle_serving_client.Client (a C++
        extension needing libcrypto.so.10); our InferOp forwards with its own client instead.
        """
        conf = {k: copy.deepcopy(v) for k, v in self.data.items() if k != "rexnet"}
        conf["op"]["infer"]["local_service_conf"].pop("model_config")
        conf["op"]["infer"]["local_service_conf"].pop("runtime")
        for key in REMOTE_KEYS:
            conf["op"]["infer"].pop(key)
        return conf


def load_config(path: Optional[PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
                device: Optional[str] = None, cpus: Optional[CpuBudget] = None) -> ServingConfig:
    """Load ``path`` (default: the file for ``device``, else cpu.yml), apply command-line overrides
    (a nested mapping, checked like a file), fill defaults (ports from rexnet_serving.defaults), derive the
    ``auto`` thread counts from ``cpus`` (default: what this process may use) and check the combination."""
    if path is None:
        path = DEVICE_CONFIGS[device or "cpu"]
    data = read_config_file(path)
    if overrides:
        _check(overrides, SCHEMA, "command line")
        data = _merge(data, overrides)
    if device is not None:
        service = data.setdefault("op", {}).setdefault("infer", {}).setdefault("local_service_conf", {})
        current = service.get("device_type", 0)
        if device == "cpu":
            service["device_type"] = 0
        elif current == 0:
            service["device_type"] = 1
    merged = _merge(_defaults(SCHEMA), data)
    source = str(Path(path).resolve())
    for key, value in (("http_port", defaults.HTTP_PORT), ("rpc_port", defaults.GRPC_PORT)):
        if merged[key] is None:
            merged[key] = value
    if merged["rexnet"]["metrics_port"] is None:
        merged["rexnet"]["metrics_port"] = defaults.METRICS_PORT
    for key, value in (("oip_http_port", defaults.OIP_HTTP_PORT), ("oip_grpc_port", defaults.OIP_GRPC_PORT)):
        if merged["rexnet"][key] is None:
            merged["rexnet"][key] = value
    service = merged["op"]["infer"]["local_service_conf"]
    if service["runtime"] is None:
        service["runtime"] = default_runtime(defaults.device_of(service["device_type"]))
    sizing = _size(merged, cpus if cpus is not None else available_cpus())
    _check_combination(merged, source)
    infer = merged["op"]["infer"]
    if infer["client_config"] is not None:  # relative to where rexnet-serve starts (it then changes dir)
        infer["client_config"] = str(Path(infer["client_config"]).resolve())
    return ServingConfig(merged, source, sizing)


def _size(conf: Dict[str, Any], cpus: CpuBudget) -> Sizing:
    """Replace the ``auto`` thread counts in ``conf`` by the ones derived from ``cpus``; explicit ones stay."""
    prepare, infer = conf["op"]["prepare"], conf["op"]["infer"]
    service = infer["local_service_conf"]

    def given(value: Any) -> Optional[int]:
        return None if value == AUTO else value

    sizing = size_service(cpus, service["device_type"] == 0 and infer["client_type"] != "brpc",
                          given(prepare["concurrency"]), given(infer["concurrency"]), given(service["thread_num"]),
                          lone_image=service["runtime"] == "openvino")
    prepare["concurrency"], infer["concurrency"] = sizing.prepare_workers, sizing.infer_streams
    service["thread_num"] = sizing.infer_threads
    return sizing


def _check_combination(conf: Dict[str, Any], source: str) -> None:
    ports = {"http_port": conf["http_port"], "rpc_port": conf["rpc_port"],
             "rexnet.metrics_port": conf["rexnet"]["metrics_port"]}
    ports.update({f"rexnet.{k}": conf["rexnet"][k] for k in ("oip_http_port", "oip_grpc_port") if conf["rexnet"][k]})
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"{source}: http_port, rpc_port, rexnet.metrics_port and the rexnet.oip_* ports must "
                          "differ, got "
                          + ", ".join(f"{k}={v}" for k, v in ports.items()))
    service = conf["op"]["infer"]["local_service_conf"]
    if service["precision"] == "fp16" and service["device_type"] != 2:
        raise ConfigError(f"{source}: op.infer.local_service_conf.precision fp16 needs device_type 2 "
                          f"(GPU TensorRT), got device_type {service['device_type']}")
    if service["device_type"] == 2 and service["precision"] != "fp16":
        raise ConfigError(f"{source}: op.infer.local_service_conf.device_type 2 (TensorRT) runs in fp16 "
                          "only; set precision: fp16, or use device_type 1 for fp32 on the GPU")
    try:
        check_runtime_options(service["runtime"], service["precision"],
                              "cpu" if service["device_type"] == 0 else "gpu")
    except OptionError as exc:
        raise ConfigError(f"{source}: op.infer.local_service_conf.{exc.option}: {exc} (device_type "
                          f"{service['device_type']})") from None
    if service["device_type"] != 0 and service["use_mkldnn"]:
        raise ConfigError(f"{source}: op.infer.local_service_conf.use_mkldnn is a CPU setting; set it "
                          "false with device_type 1 or 2")
    if service["device_type"] != 0 and not service["devices"]:
        raise ConfigError(f"{source}: op.infer.local_service_conf.devices must name a GPU (e.g. \"0\") "
                          "with device_type 1 or 2")
    infer = conf["op"]["infer"]
    if infer["client_type"] == "brpc" and not infer["server_endpoints"]:
        raise ConfigError(f"{source}: op.infer.client_type brpc needs server_endpoints, e.g. "
                          f'["127.0.0.1:{defaults.BRPC_PORT}"]')
    if infer["client_type"] != "brpc":
        stray = [k for k in ("server_endpoints", "client_config") if infer[k]]
        if stray:
            raise ConfigError(f"{source}: op.infer.{stray[0]} is a remote-op key; set op.infer.client_type: "
                              f"brpc to forward inference to it, or remove it")
    rex = conf["rexnet"]
    if conf["worker_num"] < rex["max_in_flight_requests"]:
        raise ConfigError(f"{source}: worker_num ({conf['worker_num']} gRPC threads) must be at least "
                          f"rexnet.max_in_flight_requests ({rex['max_in_flight_requests']}), or admitted gRPC "
                          "requests would wait for a thread")
    if rex["max_request_bytes"] < -(-rex["max_image_bytes"] * 4 // 3) + 4096:
        raise ConfigError(f"{source}: rexnet.max_request_bytes ({rex['max_request_bytes']}) must hold one image of "
                          f"rexnet.max_image_bytes ({rex['max_image_bytes']}) in base64 (4/3 of it) plus 4 KiB of "
                          "JSON, or the largest image allowed could never be sent over HTTP")
    if rex["max_buffered_request_bytes"] < rex["max_request_bytes"]:
        raise ConfigError(f"{source}: rexnet.max_buffered_request_bytes ({rex['max_buffered_request_bytes']}) must "
                          f"be at least rexnet.max_request_bytes ({rex['max_request_bytes']}), or a body at the "
                          "limit could never be received")
    if conf["dag"]["channel_size"] == 0 or conf["dag"]["channel_size"] < rex["max_in_flight_requests"]:
        raise ConfigError(f"{source}: dag.channel_size must bound the DAG's queues at or above "
                          f"rexnet.max_in_flight_requests ({rex['max_in_flight_requests']}), got "
                          f"{conf['dag']['channel_size']}")


def check_with_paddle(config: ServingConfig) -> None:
    """Run Paddle Serving's own checker (types, ranges it knows) on what it will be given.

    Import only after the working directory is set: importing Paddle Serving's pipeline package creates
    PipelineServingLogs/ in the current directory.
    """
    from paddle_serving_server.pipeline.pipeline_server import ServerYamlConfChecker
    try:
        ServerYamlConfChecker.load_server_yaml_conf(yml_dict=config.paddle())
    except SystemExit as exc:  # Paddle Serving's checker exits the process on a bad value
        raise ConfigError(f"{config.source}: Paddle Serving rejects the config: {exc}") from None
