"""rexnet-export: the exported directory round-trips through Paddle Inference, Paddle Serving's own
loaders (LocalPredictor, C++ Serving config preparation, GeneralModelConfig parsing) and ONNX
Runtime with the eager model's outputs; bad input fails with one clear error and leaves no files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from google.protobuf import text_format

from conftest import free_port
from rexnet_serving.defaults import LABELS_FILE, default_model_dir
from rexnet_serving.export import ExportError, export_model
from rexnet_serving.export.cli import main as cli_main
from rexnet_serving.manifest import Manifest, load_manifest, read_labels
from rexnet_serving.models import WeightsError, build_model
from rexnet_serving.preprocess import config_for

ARCH = "ReXNet_1_0"
SIZE = 224
SMALL = 64  # input size of the logits export: enough for every stride-32 stage


def _save_weights(path: Path, arch: str, class_num: int, seed: int) -> paddle.nn.Layer:
    paddle.seed(seed)
    model = build_model(arch, class_num=class_num)
    model.eval()
    # Non-trivial BN statistics, so that a mix-up of running stats would show in the outputs.
    for name, value in model.state_dict().items():
        if name.endswith("_mean") or name.endswith("_variance"):
            rng = np.random.default_rng(len(name))
            low = 0.5 if name.endswith("_variance") else -0.1
            value.set_value(rng.uniform(low, low + 0.5, value.shape).astype("float32"))
    paddle.save(model.state_dict(), str(path))
    return model


def _eager(model: paddle.nn.Layer, batch: np.ndarray, softmax: bool) -> np.ndarray:
    with paddle.no_grad():
        out = model(paddle.to_tensor(batch))
        return (paddle.nn.functional.softmax(out, axis=-1) if softmax else out).numpy()


def _batch(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype("float32")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def weights_1000(work: Path):
    path = work / "ReXNet_1_0_test.pdparams"
    return path, _save_weights(path, ARCH, 1000, seed=7)


@pytest.fixture(scope="module")
def exported(work: Path, weights_1000):
    """ONE full export (softmax, ONNX) reused by every test of this module."""
    path, model = weights_1000
    manifest = export_model(ARCH, work / "models" / ARCH, weights=str(path), onnx=True)
    return manifest, model


@pytest.fixture(scope="module")
def exported_logits(work: Path):
    """A fine-tuned-style export: a rexnet-train checkpoint ({'model': state dict, ...}) of 10
    classes with a labels file, logits, small input."""
    weights = work / "ten_classes.pdparams"
    model = _save_weights(weights, ARCH, 10, seed=3)
    paddle.save({"model": paddle.load(str(weights)), "epoch": 4}, str(weights))
    labels = work / "ten_labels.txt"
    labels.write_text("".join(f"{i} flower {i}\n" for i in range(10)))
    manifest = export_model(ARCH, work / "models" / "logits", weights=str(weights),
                            labels=str(labels), softmax=False, input_size=SMALL)
    return manifest, model


def _predictor(inference_dir: Path, model_prefix: str = "inference"):
    from paddle import inference as paddle_infer
    config = paddle_infer.Config(str(inference_dir / f"{model_prefix}.pdmodel"),
                                 str(inference_dir / f"{model_prefix}.pdiparams"))
    config.disable_glog_info()
    config.disable_mkldnn()
    return paddle_infer.create_predictor(config)


def _run_predictor(predictor, feed: str, fetch: str, batch: np.ndarray) -> np.ndarray:
    predictor.get_input_handle(feed).copy_from_cpu(batch)
    predictor.run()
    return predictor.get_output_handle(fetch).copy_to_cpu()


# -- the Paddle Inference program ------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 4])
def test_inference_program_matches_eager_with_softmax(exported, n):
    manifest, model = exported
    predictor = _predictor(manifest.inference_dir)
    assert predictor.get_input_names() == ["x"]
    assert predictor.get_output_names() == [manifest.fetch.name] == ["probs"]
    batch = _batch(n, SIZE)
    got = _run_predictor(predictor, "x", "probs", batch)
    assert got.shape == (n, 1000)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    diff = np.abs(got - _eager(model, batch, softmax=True)).max()
    print(f"paddle inference vs eager (softmax, batch {n}): max abs diff {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("n", [1, 4])
def test_inference_program_matches_eager_logits(exported_logits, n):
    manifest, model = exported_logits
    predictor = _predictor(manifest.inference_dir)
    assert predictor.get_output_names() == [manifest.fetch.name] == ["logits"]
    batch = _batch(n, SMALL)
    got = _run_predictor(predictor, "x", "logits", batch)
    assert got.shape == (n, 10)
    diff = np.abs(got - _eager(model, batch, softmax=False)).max()
    print(f"paddle inference vs eager (logits, batch {n}): max abs diff {diff:.3g}")
    assert diff <= 1e-5


# -- the manifest ------------------------------------------------------------------------------------

def test_manifest_contents(exported, weights_1000):
    import hashlib
    manifest, _ = exported
    path, _ = weights_1000
    data = json.loads((manifest.model_dir / "manifest.json").read_text())
    assert data["arch"] == ARCH and data["class_num"] == 1000 and data["input_size"] == SIZE
    assert data["preprocess"] == json.loads(json.dumps({**config_for(ARCH).to_dict(),
                                                        "crop_size": SIZE}))
    assert data["feed"] == {"name": "x", "alias": "x", "shape": [-1, 3, SIZE, SIZE],
                            "dtype": "float32"}
    assert data["fetch"] == {"name": "probs", "alias": "probs", "shape": [-1, 1000],
                             "dtype": "float32"}
    assert data["softmax"] is True and data["random_init"] is False
    assert data["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data["versions"] == {"paddle": paddle.__version__,
                                "rexnet_serving": __import__("rexnet_serving").__version__}
    assert data["paths"] == {"inference": "inference", "serving_server": "serving_server",
                             "serving_client": "serving_client", "onnx": "onnx/model.onnx"}
    assert data["exported_at"].endswith("+00:00")
    assert manifest.preprocess.crop_size == SIZE
    assert manifest.labels() == read_labels(LABELS_FILE)
    assert (manifest.model_dir / "labels.txt").read_text() == LABELS_FILE.read_text()
    for key in data["paths"]:
        assert manifest.path(key).exists()
    # no staging or backup directories left beside the export
    assert sorted(p.name for p in manifest.model_dir.parent.iterdir()
                  if p.name.startswith(".")) == []


def test_manifest_of_fine_tuned_export(exported_logits):
    manifest, _ = exported_logits
    assert manifest.class_num == 10 and manifest.softmax is False
    assert manifest.fetch.shape == (-1, 10) and manifest.input_size == SMALL
    assert manifest.preprocess.crop_size == SMALL
    assert manifest.labels() == [f"flower {i}" for i in range(10)]
    assert manifest.onnx_file is None and "onnx" not in manifest.paths


def test_manifest_from_dict_rejects_unknown_and_missing_keys(exported):
    manifest, _ = exported
    data = manifest.to_dict()
    assert Manifest.from_dict(data) == manifest  # model_dir is not compared
    with pytest.raises(ValueError, match=r"my\.json: unknown key 'colour'"):
        Manifest.from_dict({**data, "colour": "red"}, source="my.json")
    missing = {k: v for k, v in data.items() if k != "fetch"}
    with pytest.raises(ValueError, match=r"my\.json: missing key 'fetch'"):
        Manifest.from_dict(missing, source="my.json")
    with pytest.raises(ValueError, match=r"unknown key 'feed\.layout'"):
        Manifest.from_dict({**data, "feed": {**data["feed"], "layout": "NCHW"}})
    with pytest.raises(ValueError, match=r"missing key 'paths\.inference'"):
        Manifest.from_dict({**data, "paths": {"serving_server": "s", "serving_client": "c"}})
    with pytest.raises(ValueError, match=r"missing key 'preprocess\.std'"):
        Manifest.from_dict({**data, "preprocess": {k: v for k, v in data["preprocess"].items()
                                                   if k != "std"}})
    with pytest.raises(ValueError, match="class_num must be a positive integer"):
        Manifest.from_dict({**data, "class_num": "1000"})


def test_load_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported model directory: .*does not exist"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not an exported model directory: .*manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"arch": ARCH}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'manifest.json'}: missing key"):
        load_manifest(tmp_path)


def test_read_labels_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("0 cat\n2 dog\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: expected class id 1, got 2"):
        read_labels(bad)
    bad.write_text("cat\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected '<id> <name>'"):
        read_labels(bad)
    with pytest.raises(FileNotFoundError, match="labels file not found"):
        read_labels(tmp_path / "none.txt")


def test_default_model_dir(monkeypatch):
    monkeypatch.delenv("REXNET_MODEL_DIR", raising=False)
    assert default_model_dir() == Path("models") / "ReXNet_1_0"
    assert default_model_dir("ReXNet_2_0") == Path("models") / "ReXNet_2_0"
    monkeypatch.setenv("REXNET_MODEL_DIR", "/srv/model")
    assert default_model_dir() == Path("/srv/model")


# -- Paddle Serving ----------------------------------------------------------------------------------

def test_serving_configs_parse_with_paddle_servings_classes(exported):
    from paddle_serving_app.proto import general_model_config_pb2 as app_pb2
    from paddle_serving_server.proto import general_model_config_pb2 as server_pb2
    manifest, _ = exported
    files = {manifest.serving_server_dir: "serving_server_conf",
             manifest.serving_client_dir: "serving_client_conf"}
    for directory, stem in files.items():
        for pb2 in (app_pb2, server_pb2):
            text = text_format.Merge((directory / f"{stem}.prototxt").read_text(),
                                     pb2.GeneralModelConfig())
            stream = pb2.GeneralModelConfig()
            stream.ParseFromString((directory / f"{stem}.stream.prototxt").read_bytes())
            assert text == stream
            (feed,), (fetch,) = text.feed_var, text.fetch_var
            assert (feed.name, feed.alias_name, list(feed.shape), feed.feed_type,
                    feed.is_lod_tensor) == ("x", "x", [3, SIZE, SIZE], 1, False)
            assert (fetch.name, fetch.alias_name, list(fetch.shape), fetch.fetch_type,
                    fetch.is_lod_tensor) == ("probs", "probs", [1000], 1, False)
    server_files = sorted(p.name for p in manifest.serving_server_dir.iterdir())
    assert server_files == ["fluid_time_file", "inference.pdiparams", "inference.pdmodel",
                            "serving_server_conf.prototxt", "serving_server_conf.stream.prototxt"]


def test_local_predictor_matches_eager(exported):
    from paddle_serving_app.local_predict import LocalPredictor
    manifest, model = exported
    predictor = LocalPredictor()
    predictor.load_model_config(str(manifest.serving_server_dir), use_gpu=False, thread_num=1)
    batch = _batch(4, SIZE, seed=5)
    result = predictor.predict(feed={manifest.feed.alias: batch}, fetch=[manifest.fetch.alias],
                               batch=True)
    assert list(result) == ["probs"]
    diff = np.abs(result["probs"] - _eager(model, batch, softmax=True)).max()
    print(f"LocalPredictor vs eager: max abs diff {diff:.3g}")
    assert diff <= 1e-5


def test_cpp_serving_config_preparation(exported, tmp_path, monkeypatch):
    from paddle_serving_server import OpMaker, OpSeqMaker, Server
    from paddle_serving_server.proto import general_model_config_pb2, server_configure_pb2
    manifest, _ = exported

    def no_download(self):
        raise AssertionError("prepare_server must not download the serving binary")
    monkeypatch.setattr(Server, "download_bin", no_download)

    maker, sequence = OpMaker(), OpSeqMaker()
    for op in ("GeneralReaderOp", "GeneralInferOp", "GeneralResponseOp"):
        sequence.add_op(maker.create(op))
    server = Server()
    server.set_op_sequence(sequence.get_op_sequence())
    server.load_model_config(str(manifest.serving_server_dir))
    workdir = tmp_path / "workdir"
    port = free_port()
    server.prepare_server(workdir=str(workdir), port=port, device="cpu")

    def parse(name: str, message):
        return text_format.Merge((workdir / name).read_text(), message)

    toolkit = parse("GeneralInferOp_0/model_toolkit.prototxt", server_configure_pb2.ModelToolkitConf())
    (engine,) = toolkit.engines
    assert engine.model_dir == str(manifest.serving_server_dir)
    assert engine.type == "PADDLE_INFER" and not engine.use_gpu and not engine.combined_model
    general = parse("GeneralInferOp_0/general_model.prototxt",
                    general_model_config_pb2.GeneralModelConfig())
    assert [v.name for v in general.feed_var] == ["x"]
    assert [v.alias_name for v in general.fetch_var] == ["probs"]
    infer = parse("infer_service.prototxt", server_configure_pb2.InferServiceConf())
    assert infer.port == port and infer.services[0].workflows == ["workflow1"]
    workflow = parse("workflow.prototxt", server_configure_pb2.WorkflowConf())
    assert [n.type for n in workflow.workflows[0].nodes] == [
        "GeneralReaderOp", "GeneralInferOp", "GeneralResponseOp"]
    resource = parse("resource.prototxt", server_configure_pb2.ResourceConf())
    assert list(resource.general_model_file) == ["GeneralInferOp_0/general_model.prototxt"]


# -- ONNX --------------------------------------------------------------------------------------------

def test_onnx_matches_paddle(exported):
    import onnx
    import onnxruntime
    manifest, model = exported
    onnx_model = onnx.load(str(manifest.onnx_file))
    assert max(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")) >= 11
    session = onnxruntime.InferenceSession(str(manifest.onnx_file),
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    batch = _batch(4, SIZE, seed=9)
    got = session.run(None, {"x": batch})[0]
    paddle_out = _run_predictor(_predictor(manifest.inference_dir), "x", "probs", batch)
    diff = np.abs(got - paddle_out).max()
    print(f"onnxruntime vs paddle inference: max abs diff {diff:.3g}")
    assert diff <= 1e-4


# -- bad input ---------------------------------------------------------------------------------------

def _assert_nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pdparams"):
        export_model(ARCH, tmp_path / "out", weights=str(tmp_path / "nope.pdparams"))
    _assert_nothing_written(tmp_path, "out")


def test_corrupt_weights_file(tmp_path):
    corrupt = tmp_path / "corrupt.pdparams"
    corrupt.write_bytes(b"this is not a pickle" * 10)
    with pytest.raises(WeightsError, match="cannot read weights file .*corrupt.pdparams"):
        export_model(ARCH, tmp_path / "out", weights=str(corrupt))
    _assert_nothing_written(tmp_path, "out")


def test_wrong_architecture_for_weights(tmp_path):
    weights = tmp_path / "ReXNet_1_3.pdparams"
    _save_weights(weights, "ReXNet_1_3", 10, seed=0)
    with pytest.raises(ExportError, match="holds ReXNet_1_3 weights, not ReXNet_1_0"):
        export_model(ARCH, tmp_path / "out", weights=str(weights))
    _assert_nothing_written(tmp_path, "out")


def test_class_num_disagreeing_with_weights(tmp_path, weights_1000):
    with pytest.raises(ExportError, match="has a 1000-class classifier, but class_num is 5"):
        export_model(ARCH, tmp_path / "out", weights=str(weights_1000[0]), class_num=5)


def test_labels_count_mismatch(tmp_path, weights_1000):
    labels = tmp_path / "labels.txt"
    labels.write_text("0 cat\n1 dog\n")
    with pytest.raises(ExportError, match="has 2 labels, but the model has 1000 classes"):
        export_model(ARCH, tmp_path / "out", weights=str(weights_1000[0]), labels=str(labels))
    _assert_nothing_written(tmp_path, "out")


def test_existing_output_dir_needs_force(exported):
    manifest, _ = exported
    before = (manifest.model_dir / "manifest.json").read_text()
    with pytest.raises(ExportError, match="already exists: pass --force"):
        export_model(ARCH, manifest.model_dir)
    assert (manifest.model_dir / "manifest.json").read_text() == before


def test_force_refuses_to_replace_a_foreign_directory(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ExportError, match="is not an exported model directory: refusing"):
        export_model(ARCH, foreign, overwrite=True)
    assert (foreign / "holiday.jpg").exists()


# -- CLI -----------------------------------------------------------------------------------------------

def test_cli_exit_codes(tmp_path, exported, capsys):
    manifest, _ = exported
    assert cli_main(["-o", str(manifest.model_dir)]) == 1
    err = capsys.readouterr().err
    assert "already exists: pass --force" in err and "Traceback" not in err
    assert cli_main(["--weights", str(tmp_path / "none.pdparams"), "-o", str(tmp_path / "o")]) == 1
    assert "weights file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli_main(["--arch", "ResNet50"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as usage:
        cli_main(["--class-num", "many"])
    assert usage.value.code == 2


def test_cli_writes_and_replaces_with_force(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REXNET_WEIGHTS", raising=False)
    monkeypatch.delenv("REXNET_MODEL_DIR", raising=False)
    args = ["--class-num", "3", "--input-size", "32", "--no-softmax"]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert "RANDOM initialisation" in captured.err and "class_0 .. class_2" in captured.err
    assert "wrote" in captured.out and "RANDOM weights" in captured.out
    manifest = load_manifest(tmp_path / "models" / ARCH)  # the default -o
    assert manifest.random_init and manifest.weights_sha256 is None
    assert manifest.labels() == ["class_0", "class_1", "class_2"]
    first = manifest.exported_at, manifest.fetch.name
    assert cli_main(args[:-1] + ["--force"]) == 0
    replaced = load_manifest(tmp_path / "models" / ARCH)
    assert replaced.softmax and replaced.fetch.name == "probs" and first[1] == "logits"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [ARCH]


def test_console_script_error_is_one_line(tmp_path):
    script = Path(sys.executable).parent / "rexnet-export"
    proc = subprocess.run([str(script), "--weights", str(tmp_path / "missing.pdparams"),
                           "-o", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines()
             if l.startswith("rexnet-export") or "Traceback" in l]
    assert lines == [f"rexnet-export: error: weights file not found: {tmp_path / 'missing.pdparams'}"]
