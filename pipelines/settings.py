"""The ``rexnet`` section of the service config as one typed schema: :class:`RexnetSettings`; and
``op.infer`` as the service reads it: :class:`InferSettings`.

Each setting is a dataclass field that states its default once, with the YAML type it accepts and the
rule it must follow (metadata ``field``: a :class:`Field`); rexnet_pipelines.config checks files
against :func:`schema_of` (the file and the key named in every error) and hands callers a
RexnetSettings, so nobody reads the section as an untyped dict. Defaults that other code shares have
their home there and are read from it: the image limits rexnet_serving.imageio.DecodeLimits', the
batch size rexnet_serving.defaults.MAX_BATCH_IMAGES, the ports rexnet_serving.defaults'.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from rexnet_serving import defaults, pipeline_wire
from rexnet_serving.classifier import inference_model_options
from rexnet_serving.imageio import DecodeLimits
from rexnet_serving.jsonbody import DEFAULT_MAX_VALUES



@dataclass(frozen=True)
class Field:
    """One config key: the YAML types it accepts, its default, and the rule its value must follow."""

    kind: Union[type, Tuple[type, ...]]
    default: Any
    check: Optional[Callable[[Any], bool]] = None
    rule: str = ""

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with ``value`` for this key ("must be ..., got ..."), or None."""
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):  # `true` is no number
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            return f"must be {names}, got {value!r}"
        if self.check is not None and not self.check(value):
            return f"must be {self.rule}, got {value!r}"
        return None


def setting(kind: Union[type, Tuple[type, ...]], default: Any, check: Optional[Callable[[Any], bool]] = None,
            rule: str = "") -> Any:
    """A dataclass field whose default, accepted types and rule are stated once."""
    return field(default=default, metadata={"field": Field(kind, default, check, rule)})


def schema_of(settings: type) -> Dict[str, Field]:
    """The config schema of a settings dataclass: its fields' Field metadata, by name."""
    return {f.name: f.metadata["field"] for f in fields(settings)}


def _versions_ok(value: Optional[dict]) -> bool:
    return value is None or all(isinstance(k, str) and isinstance(v, list) and v
                                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)
                                for k, v in value.items())


PORT = dict(check=lambda v: v is None or 1 <= v <= 65535, rule="a port 1..65535")
_OIP_PORT = dict(check=lambda v: v is None or 0 <= v <= 65535, rule="a port 1..65535, or 0 (off)")


@dataclass(frozen=True)
class RexnetSettings:
    """What Paddle Serving's config lacks: metrics port, drain time, image limits, models, the front
    doors' limits, the bRPC backend's deadline. See serving_configs/base.yml for each."""

    service_name: str = setting(str, defaults.SERVICE_NAME,
                                lambda v: bool(v) and "/" not in v, "a non-empty name without '/'")
    metrics_port: Optional[int] = setting((int, type(None)), None, **PORT)
    # Open Inference Protocol (KServe v2) REST and gRPC: null = the default port, 0 = off.
    oip_http_port: Optional[int] = setting((int, type(None)), None, **_OIP_PORT)
    oip_grpc_port: Optional[int] = setting((int, type(None)), None, **_OIP_PORT)
    workdir: Optional[str] = setting((str, type(None)), None)
    drain_timeout_s: float = setting((int, float), 30, lambda v: 0 < v <= 3600, "0 < seconds <= 3600")
    startup_timeout_s: float = setting((int, float), 300, lambda v: 0 < v <= 3600, "0 < seconds <= 3600")
    # The image limits' defaults are DecodeLimits' (their one home), the batch's defaults.py's.
    max_image_bytes: int = setting(int, DecodeLimits.max_bytes, lambda v: v > 0, "> 0 bytes")
    max_image_pixels: int = setting(int, DecodeLimits.max_pixels, lambda v: v > 0, "> 0 pixels")
    max_images_per_request: int = setting(int, DecodeLimits.max_request_images, lambda v: 1 <= v <= 1024, "1..1024")
    max_request_pixels: int = setting(int, DecodeLimits.max_request_pixels, lambda v: v > 0, "> 0 pixels")
    max_batch_images: int = setting(int, defaults.MAX_BATCH_IMAGES,
                                    lambda v: 1 <= v <= 1024, "1..1024 images per forward pass")
    default_top_k: int = setting(int, pipeline_wire.DEFAULT_TOP_K, lambda v: v >= 1, ">= 1")
    backend_timeout_s: float = setting((int, float), 30, lambda v: 0 < v <= 3600, "0 < seconds <= 3600")
    # Several models (rexnet-serve --model-repository): the one requests get when they name none
    # (null: the only one, else the first by name) and the versions to serve per model (default: highest).
    default_model: Optional[str] = setting((str, type(None)), None,
                                           lambda v: v is None or bool(v), "null or a model name")
    model_versions: Optional[Dict[str, List[int]]] = setting(
        (dict, type(None)), None, _versions_ok,
        "null or a mapping of model name to a non-empty list of version numbers")
    # The front doors (rexnet_pipelines.frontdoor, http_front, admission): what one client can hold.
    host: str = setting(str, "0.0.0.0", lambda v: bool(v), "an address to listen on (0.0.0.0: every IPv4 one)")
    max_in_flight_requests: int = setting(int, 32, lambda v: 1 <= v <= 4096, "1..4096 requests")
    request_timeout_s: float = setting((int, float), 30, lambda v: 0 < v <= 3600, "0 < seconds <= 3600")
    max_request_bytes: int = setting(int, 64 * 2**20, lambda v: 1024 <= v <= 2**30, "1 KiB..1 GiB")
    max_buffered_request_bytes: int = setting(int, 192 * 2**20, lambda v: 1024 <= v <= 2**36, "1 KiB..64 GiB")
    max_json_values: int = setting(int, DEFAULT_MAX_VALUES,
                                   lambda v: 1000 <= v <= 100_000_000, "1000..100,000,000 values")
    max_header_bytes: int = setting(int, 64 * 1024, lambda v: 1024 <= v <= 2**20, "1 KiB..1 MiB")
    idle_timeout_s: float = setting((int, float), 30, lambda v: 0 < v <= 3600, "0 < seconds <= 3600")
    body_timeout_s: float = setting((int, float), 60, lambda v: 0 < v <= 3600, "0 < seconds <= 3600")
    http_max_connections: int = setting(int, 1024, lambda v: 1 <= v <= 65536, "1..65536 connections")
    grpc_max_connections: int = setting(int, 256, lambda v: 1 <= v <= 65536, "1..65536 connections")
    grpc_max_streams_per_connection: int = setting(int, 32, lambda v: 1 <= v <= 1024, "1..1024 streams")
    grpc_max_pending_rpcs: int = setting(int, 256, lambda v: 1 <= v <= 65536, "1..65536 RPCs")

    def __post_init__(self) -> None:
        """Settings built in code (tests, tools) follow the same rules as a config file's."""
        for name, spec in schema_of(RexnetSettings).items():
            wrong = spec.problem(getattr(self, name))
            if wrong is not None:
                raise ValueError(f"rexnet.{name} {wrong}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "RexnetSettings":
        """The settings of a checked ``rexnet`` section (keys left out keep their defaults)."""
        return cls(**section)

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits.from_settings({key: getattr(self, key) for key in DecodeLimits.SETTINGS_KEYS})


@dataclass(frozen=True)
class InferSettings:
    """``op.infer`` of a checked config, typed, with ``auto`` already replaced by the derived counts.

    Its keys are Paddle Serving's (its config goes to PipelineServer as a dict; rexnet_pipelines.config
    checks them and states their defaults in its schema); the service reads them here, not as dict keys.
    """

    runtime: str                      # local_service_conf.runtime (ours): paddle or openvino
    precision: str                    # local_service_conf.precision
    device_type: int                  # 0 CPU, 1 GPU, 2 GPU TensorRT
    devices: str                      # GPU ids, "0,1"
    thread_num: int                   # math threads per predictor (OpenVINO: per stream)
    use_mkldnn: bool
    model_config: Optional[str]       # the model directory, when the config names one
    concurrency: int                  # infer threads, each with its predictor (OpenVINO: streams)
    client_type: str                  # local_predictor, or brpc: forward to a GeneralModelService
    server_endpoints: Tuple[str, ...]
    client_config: Optional[str]
    fetch_list: Optional[Tuple[str, ...]]

    @classmethod
    def from_config(cls, infer: Mapping[str, Any]) -> "InferSettings":
        service = infer["local_service_conf"]
        fetch = infer["fetch_list"]
        return cls(service["runtime"], service["precision"], service["device_type"], service["devices"],
                   service["thread_num"], service["use_mkldnn"], service["model_config"], infer["concurrency"],
                   infer["client_type"], tuple(infer["server_endpoints"]), infer["client_config"],
                   None if fetch is None else tuple(fetch))

    @property
    def remote(self) -> bool:
        """True when the infer op forwards to a bRPC backend instead of running a local predictor."""
        return self.client_type == "brpc"

    @property
    def device(self) -> str:
        return defaults.device_of(self.device_type)

    def model_options(self, max_batch: int) -> Dict[str, Any]:
        """rexnet_serving.runtimes.load_model's keyword arguments for these settings."""
        return inference_model_options(self.device_type, self.devices, self.thread_num, self.use_mkldnn,
                                       self.precision, max_batch, self.runtime, self.concurrency)
