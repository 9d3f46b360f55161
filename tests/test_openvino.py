"""The OpenVINO runtime (rexnet_serving.runtimes.openvino) and the runtime factory (runtimes.load_model).

Parity: for every width, OpenVINO FP32 and Paddle Inference (oneDNN) on the same logits export
(``softmax=False``) agree to 1e-5 of the logits' scale, with weights whose logits are of a real scale.
Then precision (explicit f32, bf16 opt-in and refused where the CPU lacks it), streams (clones on one
compiled model), inputs and the factory's errors. The predictor contract both runtimes keep (threads,
bad batches, tensor inputs) is tested on both in tests/test_inference.py.
"""
from __future__ import annotations

from pathlib import Path

import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import numpy as np
import paddle
import pytest

from conftest import shared_file
from images import PHOTO_SET, photo
from rexnet_serving.manifest import IntegrityError
from rexnet_serving.models import MODELS, build_model
from rexnet_serving.runtimes import load_model
from rexnet_serving.runtimes.base import OptionError
from rexnet_serving.runtimes.openvino import OpenVinoModel, check_bf16, cpu_capabilities
from rexnet_serving.runtimes.paddle import InferenceModel

OFFICIAL_CHECKPOINT = "fixtures/official_rexnetv1_1.0_seed0.pth"
PARITY_BATCH = 3
RELATIVE_TOLERANCE = 1e-5


def he_initialised_weights(arch: str, path: Path, class_num: int = 1000) -> Path:
    """``arch`` with every convolution re-initialised He-normal (std sqrt(2 / fan_in), fan_in = input
    channels per group x kernel area), saved to ``path``.

    Paddle's default initialisation shrinks the activations layer after layer: a fresh ReXNet's logits
    are ~1e-7 (1e-8 for ReXNet_3_0), far below what trained weights give, and a parity test on them
    proves little. He-normal keeps the activations of order one through the whole depth: max |logit|
    is ~10 on the parity photos, every layer working at a real scale.
    """
    paddle.seed(0)
    model = build_model(arch, class_num=class_num)
    rng = np.random.default_rng(sum(map(ord, arch)))
    for param in model.parameters():
        if param.ndim == 4:  # conv kernels [out, in / groups, kh, kw]
            fan_in = int(np.prod(param.shape[1:]))
            param.set_value(rng.normal(0.0, np.sqrt(2.0 / fan_in), param.shape).astype("float32"))
    paddle.save(model.state_dict(), str(path))
    return path


def official_weights(path: Path) -> Path:
    """The converted official ClovaAI ReXNet_1_0 checkpoint (PyTorch's init: logits of scale ~0.17)."""
    from rexnet_serving.convert import convert_checkpoint
    convert_checkpoint(str(shared_file(OFFICIAL_CHECKPOINT)), str(path))
    return path


@pytest.fixture(scope="module", params=list(MODELS))
def logits_export(request, tmp_path_factory) -> Path:
    """One logits export per width (the converted official checkpoint for ReXNet_1_0)."""
    from rexnet_serving.export import export_model
    arch = request.param
    work = tmp_path_factory.mktemp(f"openvino_{arch}")
    weights = (official_weights(work / "official.pdparams") if arch == "ReXNet_1_0"
               else he_initialised_weights(arch, work / "he.pdparams"))
    return export_model(arch, work / "model", weights=str(weights), softmax=False).model_dir


def photo_batch(model_dir: Path, count: int = PARITY_BATCH) -> np.ndarray:
    """Real photos through the export's own preprocessing: [count, 3, S, S] float32."""
    from rexnet_serving.manifest import load_manifest
    from rexnet_serving.preprocess import preprocess
    images = [photo(name, size) for name, size, _, _ in PHOTO_SET[:count]]
    return np.asarray(preprocess(images, load_manifest(model_dir).preprocess), dtype=np.float32)


def test_openvino_fp32_matches_paddle_inference_on_every_width(logits_export):
    batch = photo_batch(logits_export)
    paddle_logits = InferenceModel(logits_export, cpu_threads=1).run(batch)
    model = OpenVinoModel(logits_export, cpu_threads=1)
    openvino_logits = model.run(batch)
    scale = float(np.abs(paddle_logits).max())
    diff = float(np.abs(openvino_logits - paddle_logits).max())
    print(f"{model.manifest.arch}: max |logit| {scale:.3g}, max |openvino - paddle| {diff:.3g}")
    assert model.precision == "fp32" and openvino_logits.dtype == np.float32
    assert openvino_logits.shape == paddle_logits.shape == (PARITY_BATCH, 1000)
    assert scale > 0.1, "weights with near-zero logits would make this comparison meaningless"
    assert diff <= RELATIVE_TOLERANCE * scale
    np.testing.assert_array_equal(openvino_logits.argmax(1), paddle_logits.argmax(1))


# -- everything else on one small export ---------------------------------------------------------------
SIZE = 64
CLASSES = 10


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """ReXNet_1_0 at 64x64 with 10 classes and He-initialised weights (logits of a real scale)."""
    from rexnet_serving.export import export_model
    work = tmp_path_factory.mktemp("openvino_small")
    weights = he_initialised_weights("ReXNet_1_0", work / "he.pdparams", class_num=CLASSES)
    return export_model("ReXNet_1_0", work / "model", weights=str(weights), input_size=SIZE).model_dir


@pytest.fixture(scope="module")
def ov_model(small_export) -> OpenVinoModel:
    return OpenVinoModel(small_export, cpu_threads=1, max_batch=8)


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype("float32")


def test_precision_is_set_explicitly_not_left_to_the_cpu(ov_model):
    import openvino as ov
    # Where the CPU has BF16 the plugin's own default is bf16: the model must still run f32.
    print("CPU default precision hint:", ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    assert ov_model.precision == "fp32"
    assert ov_model._compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert (ov_model.runtime, ov_model.device) == ("openvino", "cpu")


def test_bf16_runs_in_bf16_where_the_cpu_has_it_and_is_refused_where_not(small_export, ov_model):
    if "BF16" not in cpu_capabilities():
        with pytest.raises(RuntimeError, match="precision bf16 needs a CPU with BF16 support"):
            OpenVinoModel(small_export, precision="bf16")
        return
    model = load_model(small_export, runtime="openvino", precision="bf16", cpu_threads=1)
    batch = _batch(4, seed=5)
    fp32, bf16 = ov_model.run(batch), model.run(batch)
    assert model.precision == "bf16"
    assert not np.array_equal(bf16, fp32)  # really ran in bf16 (8 mantissa bits)
    np.testing.assert_allclose(bf16.sum(axis=1), 1.0, rtol=1e-3)  # still a softmax


def test_bf16_check_names_the_capabilities():
    check_bf16(("BF16", "FP32"))
    with pytest.raises(RuntimeError, match=r"capabilities are WINOGRAD, FP32, INT8: use precision fp32"):
        check_bf16(("WINOGRAD", "FP32", "INT8"))


def test_matches_paddle_on_numpy_and_paddle_tensor_inputs(small_export, ov_model):
    batch = _batch(3, seed=1)
    expected = InferenceModel(small_export, cpu_threads=1).run(batch)
    got = ov_model.run(batch)
    assert got.shape == (3, CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(ov_model.run(paddle.to_tensor(batch)), got)
    np.testing.assert_allclose(ov_model.run(batch.astype(np.float64)), got, atol=1e-6)
    strided = np.repeat(batch, 2, axis=3)[..., ::2]  # a non-contiguous view of the same values
    np.testing.assert_array_equal(ov_model.run(strided), got)


def test_streams_and_clones_share_one_compiled_model(small_export):
    model = load_model(small_export, runtime="openvino", cpu_threads=1, streams=2)
    twin = model.clone()
    assert model._compiled.get_property("NUM_STREAMS") == 2
    assert twin._compiled is model._compiled and twin._request is not model._request
    assert twin.manifest is model.manifest and twin.precision == model.precision
    batch = _batch(2, seed=7)
    np.testing.assert_array_equal(twin.run(batch), model.run(batch))


def test_a_lone_pass_uses_every_stream_and_a_busy_model_one_stream_per_pass(small_export, monkeypatch):
    """With one-thread streams, a pass that starts alone uses all the streams' threads: one image on the
    one-image model (2 threads), several split across the streams at once. While another pass of the
    model or a clone runs, a pass takes its own stream. Every path gives the same scores."""
    import threading
    import openvino as ov
    model = load_model(small_export, runtime="openvino", cpu_threads=1, streams=2)
    clone = model.clone()
    assert model.lone_threads == clone.lone_threads == 2 and clone._passes is model._passes
    lone, spare = model._passes.lone_request, model._passes.spare
    assert lone.get_compiled_model().get_property("INFERENCE_NUM_THREADS") == 2 and len(spare) == 1
    assert load_model(small_export, runtime="openvino", cpu_threads=2).lone_threads == 0  # one stream: none
    assert OpenVinoModel(small_export, cpu_threads=1, streams=2, lone_threads=0)._passes.lone_request is None
    calls = []  # (how, which request, images)
    for how in ("infer", "start_async"):
        real = getattr(ov.InferRequest, how)
        monkeypatch.setattr(ov.InferRequest, how, lambda request, inputs, *a, _real=real, _how=how, **k: (
            calls.append((_how, request, len(inputs[0]))), _real(request, inputs, *a, **k))[1])
    image, images = _batch(1, seed=3), _batch(3, seed=4)
    alone = model.run(image)
    assert calls == [("infer", lone, 1)]
    calls.clear()
    several = model.run(images)
    assert calls == [("start_async", model._request, 2), ("start_async", spare[0], 1)]
    np.testing.assert_allclose(several, OpenVinoModel(small_export, cpu_threads=1).run(images), atol=1e-6)

    # A pass of the clone is running: the next passes take their own stream, whole.
    started, release = threading.Event(), threading.Event()
    real_clone_request = clone._request

    class Held:  # the clone's request: its (split) pass holds until released
        def start_async(self, *args, **kwargs):
            started.set()
            release.wait(30)
            return real_clone_request.start_async(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(real_clone_request, name)
    clone._request = Held()
    busy = threading.Thread(target=clone.run, args=(images,))
    busy.start()
    try:
        assert started.wait(30)
        calls.clear()
        while_busy, several_while_busy = model.run(image), model.run(images)
        assert calls[:2] == [("infer", model._request, 1), ("infer", model._request, 3)]
    finally:
        release.set()
        busy.join(30)
    np.testing.assert_allclose(while_busy, alone, atol=1e-6)
    np.testing.assert_allclose(several_while_busy, several, atol=1e-6)
    # The warm-up runs the whole batch on every stream at once, and one image on the one-image model.
    calls.clear()
    model.warm_up(_batch(8))
    assert calls == [("start_async", model._request, 8), ("start_async", spare[0], 8), ("infer", lone, 1)]


def test_missing_files_and_bad_arguments(small_export, tmp_path):
    import shutil
    copy = tmp_path / "model"
    shutil.copytree(small_export, copy)
    (copy / "inference" / "inference.pdiparams").unlink()
    with pytest.raises(IntegrityError, match=r"inference\.pdiparams: missing"):
        OpenVinoModel(copy)
    with pytest.raises(ValueError, match="streams must be >= 1, got 0"):
        OpenVinoModel(small_export, streams=0)


@pytest.mark.parametrize("options, option, message", [
    (dict(runtime="onnx"), "runtime", "runtime must be one of paddle, openvino, not 'onnx'"),
    (dict(runtime="paddle", precision="bf16"), "precision", "precision bf16 needs runtime openvino"),
    (dict(runtime="openvino", device="gpu"), "runtime", "runtime openvino runs on the CPU only"),
    (dict(runtime="openvino", precision="fp16"), "precision", "runtime openvino takes fp32 or bf16"),
    (dict(runtime="paddle", precision="fp16"), "precision", "TensorRT FP16 and needs a GPU"),
    (dict(runtime="paddle", precision="int8"), "precision", "precision must be one of fp32, fp16, bf16"),
])
def test_load_model_refuses_what_cannot_run(small_export, options, option, message):
    with pytest.raises(OptionError, match=message) as info:
        load_model(small_export, **options)
    assert info.value.option == option and isinstance(info.value, ValueError)


def test_classifier_builds_its_model_through_the_factory(small_export):
    from rexnet_serving.classifier import Classifier, inference_model_options
    options = inference_model_options(0, "", 1, True, "fp32", max_batch=4, runtime="openvino", concurrency=2)
    classifier = Classifier(small_export, **options)
    assert isinstance(classifier.model, OpenVinoModel) and classifier.model.max_batch == 4
    assert classifier.model._compiled.get_property("NUM_STREAMS") == 2
    assert isinstance(Classifier(small_export).model, OpenVinoModel)  # the CPU default, as the service
    image = photo("flower", (120, 90))
    np.testing.assert_allclose(classifier.classify_arrays([image]),
                               Classifier(small_export, cpu_threads=1).classify_arrays([image]), atol=1e-6)
