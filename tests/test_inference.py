"""The predictor contract (rexnet_serving.runtimes.base) on both runtimes that load_model builds, Paddle
Inference and OpenVINO: outputs equal to the eager model, NumPy and paddle.Tensor inputs alike, thread
safety through the lock and clone(), clear errors for bad input; then InferenceModel's own options
(oneDNN on/off, devices, missing files). OpenVINO's own options: tests/test_openvino.py."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import paddle
import pytest

from rexnet_serving.export import export_model
from rexnet_serving.models import build_model
from rexnet_serving.runtimes import load_model
from rexnet_serving.runtimes.paddle import InferenceModel

ARCH = "ReXNet_1_0"
SIZE = 64  # small input keeps every run cheap; the program is the same for any size
CLASSES = 10


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("inference")
    paddle.seed(11)
    model = build_model(ARCH, class_num=CLASSES)
    model.eval()
    weights = work / "w.pdparams"
    paddle.save(model.state_dict(), str(weights))
    manifest = export_model(ARCH, work / "model", weights=str(weights), input_size=SIZE)
    return manifest.model_dir, model


@pytest.fixture(scope="module", params=["paddle", "openvino"])
def engine(request, exported):
    return load_model(exported[0], runtime=request.param, cpu_threads=1)


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype("float32")


@pytest.mark.parametrize("n", [1, 4])
def test_run_matches_eager(exported, engine, n):
    _, model = exported
    batch = _batch(n)
    got = engine.run(batch)
    with paddle.no_grad():
        expected = paddle.nn.functional.softmax(model(paddle.to_tensor(batch)), axis=-1).numpy()
    assert got.shape == (n, CLASSES) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5


def test_manifest_attribute(engine, exported):
    assert engine.manifest.model_dir == Path(exported[0]).resolve()
    assert engine.manifest.class_num == CLASSES and engine.manifest.input_size == SIZE


def test_cpu_paddle_tensor_equals_numpy(engine):
    batch = _batch(3, seed=1)
    from_numpy = engine.run(batch)
    tensor = paddle.to_tensor(batch, place=paddle.CPUPlace())
    np.testing.assert_array_equal(engine.run(tensor), from_numpy)
    np.testing.assert_array_equal(tensor.numpy(), batch)  # the predictor only reads a shared input
    # a slice of a bigger tensor and a float64 tensor take the same path
    bigger = paddle.to_tensor(np.concatenate([batch, _batch(2, seed=2)]))
    np.testing.assert_array_equal(engine.run(bigger[:3]), from_numpy)
    np.testing.assert_allclose(engine.run(tensor.astype("float64")), from_numpy, atol=1e-6)
    # the shared input buffer does not leak into the next NumPy run
    np.testing.assert_array_equal(engine.run(_batch(2, seed=2)), engine.run(bigger[3:]))
    del tensor, bigger  # freed while the predictor last saw them: the next runs must not care
    np.testing.assert_array_equal(engine.run(batch), from_numpy)
    np.testing.assert_array_equal(engine.run(batch[:1]), from_numpy[:1])


def test_float64_numpy_is_accepted(engine):
    batch = _batch(2, seed=3)
    np.testing.assert_allclose(engine.run(batch.astype(np.float64)), engine.run(batch), atol=1e-6)


def test_mkldnn_on_and_off_agree(exported):
    batch = _batch(4, seed=4)
    on = InferenceModel(exported[0], mkldnn=True, cpu_threads=1).run(batch)
    off = InferenceModel(exported[0], mkldnn=False, cpu_threads=1).run(batch)
    assert np.abs(on - off).max() <= 1e-5


def test_clone_gives_each_thread_its_own_predictor(engine):
    batches = [_batch(2, seed=10 + i) for i in range(4)]
    expected = [engine.run(b) for b in batches]
    results = {}

    def work(i: int, model) -> None:
        for _ in range(3):
            results[i] = model.run(batches[i])

    # two threads on clones, two on the shared (locked) instance
    models = [engine.clone(), engine.clone(), engine, engine]
    threads = [threading.Thread(target=work, args=(i, m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[i], want)
    assert models[0].manifest is engine.manifest


def test_bad_batches(engine):
    with pytest.raises(ValueError, match=rf"expected a batch of shape \[N, 3, {SIZE}, {SIZE}\], "
                                         r"got \[1, 3, 32, 32\]"):
        engine.run(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="expected a batch of shape"):
        engine.run(np.zeros((3, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match=r"batch size must be 1\.\.32, got 33"):
        engine.run(np.zeros((33, 3, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match=r"batch size must be 1\.\.32, got 0"):
        engine.run(np.zeros((0, 3, SIZE, SIZE), np.float32))
    # the predictor still works after rejected input
    assert engine.run(_batch(1)).shape == (1, CLASSES)


def test_bad_arguments(exported, tmp_path):
    with pytest.raises(ValueError, match="device must be one of cpu, gpu, not 'tpu'"):
        InferenceModel(exported[0], device="tpu")
    with pytest.raises(ValueError, match="cpu_threads must be >= 1"):
        InferenceModel(exported[0], cpu_threads=0)
    with pytest.raises(FileNotFoundError, match="not an exported model directory"):
        InferenceModel(tmp_path)
    if not paddle.is_compiled_with_cuda():
        with pytest.raises(RuntimeError, match="needs paddlepaddle-gpu"):
            InferenceModel(exported[0], device="gpu")


def test_missing_model_file_is_a_clear_error(exported, tmp_path):
    import shutil
    copy = tmp_path / "model"
    shutil.copytree(exported[0], copy)
    (copy / "inference" / "inference.pdiparams").unlink()
    from rexnet_serving.manifest import IntegrityError
    with pytest.raises(IntegrityError, match=r"inference\.pdiparams: missing"):
        InferenceModel(copy)
