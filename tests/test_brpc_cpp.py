"""C++ Serving backend: the generated working directory, the no-binary refusal, and (with $SERVING_BIN) the
real binary answering our bRPC client; plus the Pipeline config that forwards inference to it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format

from conftest import REPO_ROOT, free_port, wait_for_port
from rexnet_serving import defaults
from rexnet_serving.brpc import cpp_backend
from rexnet_serving.brpc.cli import main

CLI = [sys.executable, "-m", "rexnet_serving.brpc.cli"]


def _parse(path: Path, message):
    return text_format.Parse(path.read_text(), message)


def test_prepared_workdir_parses_with_paddle_serving_protos(random_model_dir, tmp_path):
    from paddle_serving_server.proto import general_model_config_pb2 as model_pb2
    from paddle_serving_server.proto import server_configure_pb2 as conf_pb2

    port = free_port()
    workdir = tmp_path / "work"
    assert main(["cpp", "--model-dir", str(random_model_dir), "--port", str(port), "--workdir", str(workdir),
                 "--thread", "3", "--prepare-only"]) == 0

    infer_service = _parse(workdir / "infer_service.prototxt", conf_pb2.InferServiceConf())
    assert infer_service.port == port
    assert [s.name for s in infer_service.services] == ["GeneralModelService"]
    workflow = _parse(workdir / "workflow.prototxt", conf_pb2.WorkflowConf())
    assert [n.type for n in workflow.workflows[0].nodes] == ["GeneralReaderOp", "GeneralInferOp",
                                                             "GeneralResponseOp"]
    engine_name = workflow.workflows[0].nodes[1].name
    resource = _parse(workdir / "resource.prototxt", conf_pb2.ResourceConf())
    assert list(resource.general_model_file) == [f"{engine_name}/general_model.prototxt"]
    assert list(resource.model_toolkit_file) == [f"{engine_name}/model_toolkit.prototxt"]

    general = _parse(workdir / engine_name / "general_model.prototxt", model_pb2.GeneralModelConfig())
    from rexnet_serving.manifest import load_manifest
    manifest = load_manifest(random_model_dir)
    assert [(v.name, v.alias_name, list(v.shape), v.feed_type) for v in general.feed_var] == \
        [(manifest.feed.name, manifest.feed.alias, list(manifest.feed.shape[1:]), 1)]
    assert [(v.name, v.alias_name) for v in general.fetch_var] == [(manifest.fetch.name, manifest.fetch.alias)]

    toolkit = _parse(workdir / engine_name / "model_toolkit.prototxt", conf_pb2.ModelToolkitConf())
    (engine,) = toolkit.engines
    assert engine.name == engine_name and engine.type == "PADDLE_INFER"
    assert Path(engine.model_dir) == manifest.serving_server_dir.resolve()
    assert not engine.use_gpu and list(engine.gpu_ids) == [-1]


def test_gpu_ids_reach_the_engine_config(random_model_dir, tmp_path, monkeypatch):
    from paddle_serving_server.proto import server_configure_pb2 as conf_pb2
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    workdir = tmp_path / "work"
    assert main(["cpp", "--model-dir", str(random_model_dir), "--port", str(free_port()),
                 "--workdir", str(workdir), "--gpu-ids", "0", "--prepare-only"]) == 0
    toolkit = _parse(workdir / "GeneralInferOp_0" / "model_toolkit.prototxt", conf_pb2.ModelToolkitConf())
    assert toolkit.engines[0].use_gpu and list(toolkit.engines[0].gpu_ids) == [0]


def test_command_line_matches_paddle_serving(random_model_dir, tmp_path):
    server = cpp_backend.build_server(cpp_backend.model_serving_dir(random_model_dir), threads=3)
    cpp_backend.prepare_workdir(server, tmp_path, port=free_port())
    command = cpp_backend.serving_command(server, Path("/opt/serving"))
    assert command[0] == "/opt/serving"
    assert command[1] == "-enable_model_toolkit" and "-use_calib=False" in command
    rest = [arg for arg in command[2:] if arg != "-use_calib=False"]
    flags = dict(zip(rest[0::2], rest[1::2]))
    assert all(flag.startswith("-") for flag in flags)
    assert flags["-num_threads"] == "3" and flags["-bthread_concurrency"] == "3"
    assert flags["-workflow_path"] == str(tmp_path) and flags["-workflow_file"] == "workflow.prototxt"
    assert flags["-max_body_size"] == str(64 * 2**20)


def _no_local_binary() -> bool:
    from paddle_serving_server import Server
    return not cpp_backend.binary_location(Server()).binary.exists()


@pytest.mark.skipif(not _no_local_binary(), reason="a C++ Serving binary package is unpacked here")
def test_without_a_binary_it_fails_at_once_with_one_message(random_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SERVING_BIN"}
    workdir = tmp_path / "work"
    proc = subprocess.run(CLI + ["cpp", "--model-dir", str(random_model_dir), "--port", str(free_port()),
                                 "--workdir", str(workdir)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rexnet-brpc")]
    assert len(lines) == 1, proc.stderr
    assert "set SERVING_BIN to a serving binary" in lines[0]
    assert "paddle-serving-server 0.9.0 binary package" in lines[0] and "serving-cpu-" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()  # refused before writing anything
    assert not list(tmp_path.glob("*.tar.gz"))  # and nothing was fetched


def test_serving_bin_that_is_not_executable_is_refused(random_model_dir, tmp_path, monkeypatch, capsys):
    fake = tmp_path / "serving"
    fake.write_text("not a program")
    monkeypatch.setenv("SERVING_BIN", str(fake))
    assert main(["cpp", "--model-dir", str(random_model_dir), "--port", str(free_port()),
                 "--workdir", str(tmp_path / "work")]) == 1
    assert f"SERVING_BIN={fake} is not an executable file" in capsys.readouterr().err


def test_serving_bin_is_executed_with_paddle_serving_flags(random_model_dir, tmp_path):
    record = tmp_path / "argv.txt"
    stand_in = tmp_path / "serving"  # records how it was started instead of serving
    stand_in.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\nexit 7\n")
    stand_in.chmod(0o755)
    port = free_port()
    proc = subprocess.run(CLI + ["cpp", "--model-dir", str(random_model_dir), "--port", str(port),
                                 "--workdir", str(tmp_path / "work")],
                          env=dict(os.environ, SERVING_BIN=str(stand_in)), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 7, proc.stderr  # the process became the binary (exec), its status is ours
    argv = record.read_text().split()
    assert argv[0] == "-enable_model_toolkit"
    assert argv[argv.index("-port") + 1] == str(port)
    assert argv[argv.index("-workflow_path") + 1] == str((tmp_path / "work").resolve())
    assert (tmp_path / "work" / "workflow.prototxt").is_file()


def test_port_in_use_is_reported(random_model_dir, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["cpp", "--model-dir", str(random_model_dir), "--port", str(port),
                     "--workdir", str(tmp_path / "work"), "--prepare-only"]) == 1
    assert f"Port {port} is already used" in capsys.readouterr().err


def test_not_an_random_model_dir_is_reported(tmp_path, capsys):
    assert main(["cpp", "--model-dir", str(tmp_path), "--prepare-only"]) == 1
    assert "not an exported model" in capsys.readouterr().err


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SERVING_BIN"),
                    reason="needs SERVING_BIN pointing at Paddle Serving's C++ 'serving' binary (not "
                           "downloadable here); the native endpoint's tests cover the same client")
def test_real_cpp_serving_answers_our_client(random_model_dir, tmp_path):
    from rexnet_serving.clients.brpc import BrpcClient
    from rexnet_serving.runtimes.paddle import InferenceModel
    from rexnet_serving.manifest import load_manifest

    port = free_port()
    proc = subprocess.Popen(CLI + ["cpp", "--model-dir", str(random_model_dir), "--port", str(port),
                                   "--workdir", str(tmp_path / "work"), "--thread", "2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(proc, port, "C++ Serving")
        manifest = load_manifest(random_model_dir)
        batch = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
        with BrpcClient(timeout=60) as client:
            client.load_client_config(manifest.serving_client_dir / "serving_client_conf.prototxt")
            client.connect([f"127.0.0.1:{port}"])
            got = client.predict(feed={manifest.feed.alias: batch}, fetch=[manifest.fetch.alias], batch=True)
        expected = InferenceModel(random_model_dir).run(batch)
        np.testing.assert_allclose(got[manifest.fetch.alias], expected, atol=1e-5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the Pipeline config that forwards inference to C++ Serving ----------------------------------------
CONFIG = REPO_ROOT / "serving_configs" / "brpc_backend.yml"


def test_brpc_backend_config_forwards_to_the_cpp_backend(random_model_dir):
    from rexnet_serving.manifest import load_manifest
    data = yaml.safe_load(CONFIG.read_text())
    assert data["extends"] == "cpu.yml"
    infer = data["op"]["infer"]
    assert infer["client_type"] == "brpc"
    assert infer["server_endpoints"] == [f"127.0.0.1:{defaults.BRPC_PORT}"]
    assert infer["client_config"] is None  # the --model-dir export's serving_client/, the one C++ Serving gets
    manifest = load_manifest(random_model_dir)
    assert infer["fetch_list"] == [manifest.fetch.alias]
    # decode and preprocess stay in the Pipeline: this file does not touch them
    assert set(data["op"]) == {"infer"}
    assert "libcrypto.so.10" in CONFIG.read_text()


def test_brpc_backend_config_passes_the_pipeline_loader():
    from rexnet_pipelines.config import REMOTE_KEYS, load_config
    config = load_config(CONFIG)
    assert config.inference.remote
    assert config.data["op"]["infer"]["server_endpoints"] == [f"127.0.0.1:{defaults.BRPC_PORT}"]
    assert config.data["op"]["infer"]["client_type"] == "brpc"
    assert not set(REMOTE_KEYS) & set(config.paddle()["op"]["infer"])  # never Paddle Serving's own client
