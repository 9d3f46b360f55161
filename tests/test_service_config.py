"""The serving config loader: shipped files load, merges are key by key, bad keys/values name file and key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rexnet_pipelines.config import CONFIG_DIR, ConfigError, load_config, read_config_file
from rexnet_serving import defaults


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, device_type, precision, runtime", [
    ("cpu.yml", 0, "fp32", "openvino"), ("gpu.yml", 1, "fp32", "paddle"), ("gpu_trt_fp16.yml", 2, "fp16", "paddle"),
    ("brpc_backend.yml", 0, "fp32", "openvino")])
def test_shipped_configs_load_with_default_ports(name, device_type, precision, runtime):
    config = load_config(CONFIG_DIR / name)
    assert config.infer_service["device_type"] == device_type
    assert config.infer_service["precision"] == precision
    assert config.infer_service["runtime"] == runtime
    assert "runtime" not in config.paddle()["op"]["infer"]["local_service_conf"]  # ours, not Paddle's
    assert (config.http_port, config.rpc_port, config.metrics_port) == (
        defaults.HTTP_PORT, defaults.GRPC_PORT, defaults.METRICS_PORT)
    assert config.rexnet["service_name"] == defaults.SERVICE_NAME
    paddle = config.paddle()
    assert "rexnet" not in paddle and "model_config" not in paddle["op"]["infer"]["local_service_conf"]
    assert paddle["dag"]["is_thread_op"] is True


def test_device_flag_picks_the_device_file_and_overrides_a_given_one():
    assert load_config(device="gpu").infer_service["device_type"] == 1
    assert load_config(CONFIG_DIR / "gpu_trt_fp16.yml", device="gpu").infer_service["device_type"] == 2
    assert load_config(CONFIG_DIR / "cpu.yml", device="cpu").inference.device == "cpu"


def test_extends_merges_key_by_key(tmp_path):
    child = write(tmp_path / "child.yml", f"extends: {CONFIG_DIR / 'cpu.yml'}\n"
                                          "op:\n  infer:\n    batch_size: 4\n"
                                          "rexnet:\n  max_image_bytes: 1000\n")
    config = load_config(child)
    infer = config.data["op"]["infer"]
    assert infer["batch_size"] == 4
    assert infer["auto_batching_timeout"] == 5          # from cpu.yml
    assert infer["local_service_conf"]["use_mkldnn"] is True  # from cpu.yml
    assert config.data["worker_num"] == 40              # from base.yml
    assert config.rexnet["max_image_bytes"] == 1000
    assert config.rexnet["drain_timeout_s"] == 30


def test_command_line_overrides_ports(tmp_path):
    config = load_config(CONFIG_DIR / "cpu.yml", {"http_port": 18100, "rpc_port": 18101,
                                                  "rexnet": {"metrics_port": 18102}})
    assert (config.http_port, config.rpc_port, config.metrics_port) == (18100, 18101, 18102)
    assert config.paddle()["http_port"] == 18100


@pytest.mark.parametrize("text, message", [
    ("op:\n  infer:\n    batch_sise: 4\n", "unknown key 'op.infer.batch_sise'"),
    ("op:\n  resize: {}\n", "unknown key 'op.resize'"),
    ("rexnet:\n  drain_timeout: 5\n", "unknown key 'rexnet.drain_timeout'"),
    ("op:\n  infer:\n    batch_size: 0\n", "op.infer.batch_size must be 1..256"),
    ("op:\n  infer:\n    local_service_conf:\n      device_type: 3\n", "device_type must be 0 (CPU)"),
    ("op:\n  prepare:\n    concurrency: yes\n", "op.prepare.concurrency must be int"),
    ("http_port: 70000\n", "http_port must be a port 1..65535"),
    ("op:\n  infer:\n    timeout: 1000\n", "op.infer.timeout must be -1"),
    ("rexnet:\n  drain_timeout_s: 0\n", "rexnet.drain_timeout_s must be 0 < seconds"),
    ("dag:\n  is_thread_op: false\n", "dag.is_thread_op must be true"),
    ("rexnet:\n  max_json_values: 10\n", "rexnet.max_json_values must be 1000..100,000,000"),
    ("rexnet:\n  max_buffered_request_bytes: 1.5\n", "rexnet.max_buffered_request_bytes must be int"),
])
def test_bad_keys_and_values_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path / "bad.yml", f"extends: {CONFIG_DIR / 'cpu.yml'}\n{text}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_error_in_an_extended_file_names_that_file(tmp_path):
    base = write(tmp_path / "base.yml", "worker_num: -1\n")
    child = write(tmp_path / "child.yml", "extends: base.yml\n")
    with pytest.raises(ConfigError, match=f"{base}: worker_num must be 1..1024"):
        read_config_file(child)


@pytest.mark.parametrize("text, message", [
    ("op:\n  infer:\n    local_service_conf:\n      precision: fp16\n", "precision fp16 needs device_type 2"),
    ("op:\n  infer:\n    local_service_conf:\n      device_type: 1\n      devices: '0'\n      runtime: paddle\n",
     "use_mkldnn is a CPU setting"),
    ("worker_num: 8\n", "worker_num \\(8 gRPC threads\\) must be at least rexnet.max_in_flight_requests"),
    ("dag:\n  channel_size: 0\n", "dag.channel_size must bound the DAG's queues"),
    ("rexnet:\n  max_in_flight_requests: 100\n", "worker_num \\(40 gRPC threads\\)"),
    ("http_port: 9000\nrpc_port: 9000\n", "must differ"),
    ("rexnet:\n  max_request_bytes: 20000000\n", "rexnet.max_request_bytes \\(20000000\\) must hold one image of "
                                                  "rexnet.max_image_bytes"),
    ("rexnet:\n  max_buffered_request_bytes: 1048576\n", "rexnet.max_buffered_request_bytes \\(1048576\\) must be "
                                                          "at least rexnet.max_request_bytes"),
])
def test_combinations_are_checked(tmp_path, text, message):
    path = write(tmp_path / "bad.yml", f"extends: {CONFIG_DIR / 'cpu.yml'}\n{text}")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_base_defaults_to_the_devices_runtime_and_bf16_runs_on_openvino(tmp_path):
    # one home for the default runtime: rexnet_serving.runtimes.default_runtime, as the offline tools'
    base = load_config(CONFIG_DIR / "base.yml")
    assert (base.infer_service["runtime"], base.infer_service["precision"]) == ("openvino", "fp32")
    assert load_config(CONFIG_DIR / "gpu.yml").infer_service["runtime"] == "paddle"
    assert load_config(CONFIG_DIR / "gpu.yml", device="cpu").infer_service["runtime"] == "openvino"
    bf16 = write(tmp_path / "bf16.yml", f"extends: {CONFIG_DIR / 'cpu.yml'}\n"
                                        "op:\n  infer:\n    local_service_conf:\n      precision: bf16\n")
    assert load_config(bf16).infer_service["precision"] == "bf16"


@pytest.mark.parametrize("extends, text, message", [
    ("cpu.yml", "runtime: onnxruntime\n",
     "op.infer.local_service_conf.runtime must be paddle or openvino (null: the device's default), got 'onnxruntime'"),
    ("cpu.yml", "precision: int8\n", "op.infer.local_service_conf.precision must be fp32 or fp16 or bf16"),
    ("cpu.yml", "runtime: paddle\n      precision: bf16\n",
     "op.infer.local_service_conf.precision: precision bf16 needs runtime openvino"),
    ("gpu.yml", "runtime: openvino\n",
     "op.infer.local_service_conf.runtime: runtime openvino runs on the CPU only, not on device 'gpu'"),
    ("gpu_trt_fp16.yml", "runtime: openvino\n", "op.infer.local_service_conf.runtime: runtime openvino runs "
                                                  "on the CPU only"),
    ("cpu.yml", "runtime: openvino\n      device_type: 2\n      devices: '0'\n      precision: fp16\n      use_mkldnn: false\n",
     "op.infer.local_service_conf.runtime: runtime openvino runs on the CPU only"),
])
def test_runtime_errors_name_the_file_and_key(tmp_path, extends, text, message):
    path = write(tmp_path / "bad.yml", f"extends: {CONFIG_DIR / extends}\n"
                                       f"op:\n  infer:\n    local_service_conf:\n      {text}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path.resolve()}: ") and message in str(info.value)


def test_serve_refuses_openvino_on_the_gpu_and_bf16_on_paddle():
    run = run_serve("--config", str(CONFIG_DIR / "cpu.yml"), "--device", "gpu", "--runtime", "openvino")
    assert run.returncode == 2
    assert "op.infer.local_service_conf.runtime: runtime openvino runs on the CPU only" in run.stderr
    run = run_serve("--runtime", "paddle", "--precision", "bf16")
    assert run.returncode == 2
    assert "op.infer.local_service_conf.precision: precision bf16 needs runtime openvino" in run.stderr


def test_runtime_and_precision_flags_override_the_config():
    from rexnet_pipelines.cli import _overrides, build_parser
    args = build_parser().parse_args(["--runtime", "paddle"])
    assert load_config(None, _overrides(args)).infer_service["runtime"] == "paddle"
    args = build_parser().parse_args(["--precision", "bf16"])
    assert load_config(None, _overrides(args)).infer_service["precision"] == "bf16"


def test_overrides_are_checked_like_files():
    with pytest.raises(ConfigError, match="command line: http_port must be a port"):
        load_config(CONFIG_DIR / "cpu.yml", {"http_port": 0})


def test_missing_file_loop_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yml")
    write(tmp_path / "a.yml", "extends: b.yml\n")
    write(tmp_path / "b.yml", "extends: a.yml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path / "list.yml", "- 1\n- 2\n"))


def run_serve(*args: str) -> "subprocess.CompletedProcess":
    return subprocess.run([str(Path(sys.executable).parent / "rexnet-serve"), *args], capture_output=True,
                          text=True, timeout=120)


def test_serve_exit_codes_for_bad_config_and_model(tmp_path):
    bad = write(tmp_path / "bad.yml", "op:\n  infer:\n    batch_sise: 4\n")
    run = run_serve("--config", str(bad))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"rexnet-serve: {bad}: unknown key")
    run = run_serve("--model-dir", str(tmp_path / "nowhere"))
    assert run.returncode == 1 and "not an exported model directory" in run.stderr


def test_serve_dispatches_brpc_subcommand():
    run = run_serve("brpc", "--help")
    assert run.returncode == 0 and "rexnet-brpc" in run.stdout


def test_open_inference_protocol_ports():
    config = load_config(CONFIG_DIR / "cpu.yml")
    assert (config.rexnet["oip_http_port"], config.rexnet["oip_grpc_port"]) == (defaults.OIP_HTTP_PORT,
                                                                                defaults.OIP_GRPC_PORT)
    off = load_config(CONFIG_DIR / "cpu.yml", {"rexnet": {"oip_http_port": 0, "oip_grpc_port": 0}})
    assert (off.rexnet["oip_http_port"], off.rexnet["oip_grpc_port"]) == (0, 0)
    with pytest.raises(ConfigError, match="the rexnet.oip_\\* ports must differ"):
        load_config(CONFIG_DIR / "cpu.yml", {"http_port": defaults.OIP_HTTP_PORT})
    with pytest.raises(ConfigError, match="oip_grpc_port"):
        load_config(CONFIG_DIR / "cpu.yml", {"rexnet": {"oip_grpc_port": 70000}})
    from rexnet_pipelines.cli import _overrides, build_parser
    args = build_parser().parse_args(["--oip-http-port", "0", "--oip-grpc-port", "18001"])
    assert _overrides(args)["rexnet"] == {"oip_http_port": 0, "oip_grpc_port": 18001}


def test_the_image_limits_and_the_batch_default_have_one_home(tmp_path):
    """base.yml states no limit values: the config's defaults are DecodeLimits' and defaults.py's, and
    the service builds its DecodeLimits from the settings by name (a key set in a file wins)."""
    from rexnet_serving.imageio import DecodeLimits
    rex = load_config(CONFIG_DIR / "base.yml").rexnet
    assert DecodeLimits.from_settings(rex) == DecodeLimits()
    assert rex["max_batch_images"] == defaults.MAX_BATCH_IMAGES
    custom = write(tmp_path / "custom.yml", f"extends: {CONFIG_DIR / 'cpu.yml'}\n"
                                            "rexnet:\n  max_images_per_request: 3\n  max_image_pixels: 1000\n")
    limits = DecodeLimits.from_settings(load_config(custom).rexnet)
    assert (limits.max_request_images, limits.max_pixels, limits.max_bytes) == (3, 1000, DecodeLimits.max_bytes)


def test_settings_built_in_code_follow_the_files_rules():
    from rexnet_pipelines.settings import RexnetSettings
    assert RexnetSettings().max_in_flight_requests == load_config(CONFIG_DIR / "base.yml").settings.max_in_flight_requests
    with pytest.raises(ValueError, match=r"rexnet.max_in_flight_requests must be 1..4096 requests, got 0"):
        RexnetSettings(max_in_flight_requests=0)
    with pytest.raises(ValueError, match=r"rexnet.idle_timeout_s must be int or float, got True"):
        RexnetSettings(idle_timeout_s=True)


def test_the_infer_op_is_read_typed_and_gives_the_predictor_options():
    from rexnet_serving.cpus import HOST, CpuBudget
    infer = load_config(CONFIG_DIR / "cpu.yml", cpus=CpuBudget(2, HOST)).inference
    assert (infer.runtime, infer.precision, infer.device, infer.remote) == ("openvino", "fp32", "cpu", False)
    assert (infer.concurrency, infer.thread_num, infer.fetch_list, infer.server_endpoints) == (2, 1, None, ())
    assert infer.model_options(16) == {"runtime": "openvino", "precision": "fp32", "device": "cpu", "gpu_id": 0,
                                       "cpu_threads": 1, "mkldnn": True, "max_batch": 16, "streams": 2}
    gpu = load_config(CONFIG_DIR / "gpu_trt_fp16.yml").inference
    assert (gpu.device, gpu.runtime, gpu.model_options(8)["gpu_id"], gpu.model_options(8)["mkldnn"]) == \
        ("gpu", "paddle", 0, False)
