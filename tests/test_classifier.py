"""The offline predictor's stages (rexnet_serving.classifier, .postprocess) and the request rules
(rexnet_serving.pipeline_wire), without a server, on a real exported model."""
from __future__ import annotations

import base64

import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import numpy as np
import pytest

from conftest import SCORED_CLASSES
from images import bmp_strip, encode, make_photo_set, photo
from rexnet_serving import pipeline_wire
from rexnet_serving import postprocess
from rexnet_serving.classifier import Classifier, decode_payloads, inference_model_options, preprocess_images
from rexnet_serving.imageio import DecodeLimits, ImageError
from rexnet_serving.preprocess import preprocess, preprocess_opencv
from rexnet_serving.results import Prediction

@pytest.fixture(scope="module")
def classifier(scored_model_dir) -> Classifier:
    return Classifier(scored_model_dir,
                      limits=DecodeLimits(max_bytes=5_000_000, max_pixels=4_000_000))


# -- postprocess --------------------------------------------------------------------------------
def test_softmax_rows_sum_to_one_and_keep_order():
    probs = postprocess.softmax(np.array([[1000.0, 999.0, 0.0], [0.0, 0.0, 0.0]], np.float32))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert probs[0].argmax() == 0 and np.isfinite(probs).all()


def test_top_k_orders_by_score_and_breaks_ties_by_lower_id():
    probs = np.array([[0.1, 0.3, 0.3, 0.2, 0.1]], np.float32)
    (best,) = postprocess.top_k(probs, 3, ["a", "b", "c", "d", "e"])
    assert [(p.class_id, p.label) for p in best] == [(1, "b"), (2, "c"), (3, "d")]
    assert isinstance(best[0].score, float) and best[0].score == pytest.approx(0.3)
    with pytest.raises(ValueError, match="top_k must be between 1 and 5"):
        postprocess.top_k(probs, 6, list("abcde"))


def test_assemble_slots_errors_back_in_request_order():
    preds = [[Prediction(1, "one", 0.9)], [Prediction(2, "two", 0.8)]]
    results = postprocess.assemble(3, preds, {1: ImageError("truncated", "cut short")})
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].to_dict() == {"error": {"code": "truncated", "message": "cut short"}}
    assert results[2].predictions[0].class_id == 2
    with pytest.raises(ValueError):
        postprocess.assemble(4, preds, {})


# -- decode ---------------------------------------------------------------------------------------
def test_decode_payloads_keeps_going_past_bad_images():
    jpeg = encode(photo("china", (64, 48)), "jpeg")
    images, errors = decode_payloads([jpeg, b"", base64.b64encode(jpeg).decode(), "@@", jpeg[:200]])
    assert len(images) == 2 and images[0].shape == (48, 64, 3)
    np.testing.assert_array_equal(images[0], images[1])  # bytes and base64 decode alike
    assert {i: e.code for i, e in errors.items()} == {1: "empty", 3: "invalid_base64", 4: "truncated"}


# -- the whole offline predictor ----------------------------------------------------------------
def test_classify_matches_the_stages_run_by_hand(classifier, tmp_path):
    paths = make_photo_set(tmp_path / "photos")
    payloads = [p.read_bytes() for p in paths]
    results = classifier.classify(payloads, top_k=5)
    assert len(results) == len(paths) and all(r.ok for r in results)
    images, errors = classifier.decode(payloads)
    assert not errors
    probs = classifier.probabilities(classifier.preprocess(images))
    assert probs.shape == (len(paths), SCORED_CLASSES)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    for result, row in zip(results, probs):
        assert [p.class_id for p in result.predictions] == list(np.argsort(-row, kind="stable")[:5])
        assert [p.score for p in result.predictions] == pytest.approx(sorted(row, reverse=True)[:5], abs=1e-6)
        assert result.predictions[0].label == f"class {result.predictions[0].class_id}"


def test_classify_one_at_a_time_equals_batched(classifier):
    payloads = [encode(photo("china", (200, 150)), "jpeg"), encode(photo("flower", (150, 220)), "png")]
    batched = classifier.classify(payloads, top_k=3)
    for payload, together in zip(payloads, batched):
        (alone,) = classifier.classify([payload], top_k=3)
        assert [p.class_id for p in alone.predictions] == [p.class_id for p in together.predictions]
        assert [p.score for p in alone.predictions] == pytest.approx(
            [p.score for p in together.predictions], abs=1e-5)


def test_preprocessing_follows_the_inference_device(classifier):
    import paddle
    images = [photo("china", (200, 150)), photo("flower", (150, 220))]
    cfg = classifier.preprocess_config  # the manifest's constants, for both paths
    host = classifier.preprocess(images)  # a CPU classifier: OpenCV on the host
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, preprocess_opencv(images, cfg))
    on_device = preprocess_images(images, cfg, on_device=True)  # the GPU path, here on the current device
    assert isinstance(on_device, paddle.Tensor)
    np.testing.assert_array_equal(on_device.numpy(), preprocess(images, cfg).numpy())
    # The infer op re-stacks per-image rows where they are: NumPy rows with NumPy, tensors with Paddle.
    np.testing.assert_array_equal(Classifier.stack(list(host)), host)
    stacked = Classifier.stack([on_device[0], on_device[1]])
    assert isinstance(stacked, paddle.Tensor)
    np.testing.assert_array_equal(stacked.numpy(), on_device.numpy())
    # Both batches feed the predictor: the same top class from either path.
    assert (classifier.probabilities(host).argmax(1) == classifier.probabilities(on_device).argmax(1)).all()


def test_classify_reports_limits_and_bad_images_per_image(classifier):
    good = encode(photo("china", (120, 90)), "jpeg")
    huge = encode(np.zeros((2100, 2000, 3), np.uint8), "png")  # 4.2 MP, tiny file
    results = classifier.classify([good, huge, b"GIF89a....", b"x" * 5_000_001, good], top_k=2)
    assert [r.error_code for r in results] == [None, "too_many_pixels", "unsupported_format", "too_large", None]
    assert results[0].predictions == results[4].predictions
    assert [r.ok for r in classifier.classify([b"nope"], top_k=1)] == [False]


def test_inference_model_options_from_paddle_serving_keys():
    assert inference_model_options(0, "", 4, True, "fp32") == {
        "runtime": None, "precision": "fp32", "device": "cpu", "gpu_id": 0, "cpu_threads": 4,
        "mkldnn": True, "max_batch": 32, "streams": 1}
    gpu = inference_model_options(2, "1,2", 1, False, "fp16", max_batch=16)
    assert (gpu["device"], gpu["gpu_id"], gpu["precision"], gpu["mkldnn"], gpu["max_batch"]) == (
        "gpu", 1, "fp16", False, 16)
    openvino = inference_model_options(0, "", 2, True, "bf16", runtime="openvino", concurrency=3)
    assert (openvino["runtime"], openvino["precision"], openvino["streams"], openvino["cpu_threads"]) == (
        "openvino", "bf16", 3, 2)


# -- request rules --------------------------------------------------------------------------------
def test_image_keys_and_their_order():
    assert pipeline_wire.image_keys(1) == ["image"]
    assert pipeline_wire.image_keys(3) == ["image_0", "image_1", "image_2"]
    assert pipeline_wire.order_image_keys(["image_10"] + [f"image_{i}" for i in range(10)])[-1] == "image_10"
    assert not pipeline_wire.is_image_key("image_0\n") and not pipeline_wire.is_image_key("image_01")


@pytest.mark.parametrize("fields, code", [
    ({"top_k": "5"}, "missing_image"),
    ({"image": "x", "image_0": "y"}, "invalid_key"),
    ({"image_0": "x", "image_2": "y"}, "invalid_key"),
    ({"image": "x", "img": "y"}, "unknown_key"),
    ({"image": "x", "top_k": "0"}, "invalid_top_k"),
    ({"image": "x", "top_k": "11"}, "invalid_top_k"),
    ({"image": "x", "top_k": "five"}, "invalid_top_k"),
    ({"image": "x", "top_k": b"5"}, "invalid_top_k"),
    ({f"image_{i}": "x" for i in range(5)}, "too_many_images"),
    # `$` would match before a trailing newline: these keys must be unknown, not rewritten then lost
    ({"image_0\n": "x"}, "unknown_key"),
    ({"image\n": "x"}, "unknown_key"),
    ({"image_0": "x", "image_1\n": "y"}, "unknown_key"),
])
def test_parse_fields_refuses_malformed_requests(fields, code):
    with pytest.raises(pipeline_wire.RequestError) as info:
        pipeline_wire.parse_fields(fields, max_images=4, max_top_k=10, default_top_k=5)
    assert info.value.code == code


def test_parse_fields_orders_payloads_and_defaults_top_k():
    payloads, top_k = pipeline_wire.parse_fields({"image_1": "b", "image_0": "a"}, 4, 10, 5)
    assert (payloads, top_k) == (["a", "b"], 5)
    assert pipeline_wire.parse_fields({"image": "a", "top_k": " 3 "}, 4, 3, 5) == (["a"], 3)
    assert pipeline_wire.parse_fields({"image": "a"}, 4, 3, 5)[1] == 3  # default capped at the class count


def test_decode_payloads_refuses_a_request_over_its_pixel_budget():
    from rexnet_serving.imageio import RequestTooLargeError
    image = encode(photo("china", (400, 300)), "png")
    limits = DecodeLimits(max_request_pixels=200_000)  # one 400x300 image fits, two do not
    images, errors = decode_payloads([image, b"junk"], limits)
    assert len(images) == 1 and errors[1].code == "not_an_image"
    with pytest.raises(RequestTooLargeError):
        decode_payloads([image, base64.b64encode(image).decode()], limits)


def test_a_decoder_exception_costs_only_its_image(classifier):
    good = encode(photo("china", (120, 90)), "jpeg")
    results = classifier.classify([good, bmp_strip(1_200_000), good], top_k=2)  # 3.6 MB, 1.2 MP
    assert [r.error_code for r in results] == [None, "not_an_image", None]
    assert results[0].predictions == results[2].predictions


# Run in a child: before rows were made one type, paddle.stack([Tensor, ndarray]) was a SIGSEGV (Paddle
# 2.6.2), which would take the test process with it.
_MIXED_STACK = """
import rexnet_serving.imageio
import numpy as np, paddle
from rexnet_serving.classifier import Classifier
rng = np.random.default_rng(0)
rows = [rng.standard_normal((3, 8, 8)).astype(np.float32) for _ in range(4)]
mixed = [paddle.to_tensor(rows[0]), rows[1], paddle.to_tensor(rows[2].astype(np.float64)), rows[3].astype(np.float64)]
for order in (mixed, mixed[::-1]):
    batch = Classifier.stack(order)
    assert isinstance(batch, paddle.Tensor) and batch.dtype == paddle.float32, type(batch)
    assert str(batch.place) == str(paddle.to_tensor(rows[0]).place)
    want = np.stack([np.asarray(r.numpy() if isinstance(r, paddle.Tensor) else r, np.float32) for r in order])
    np.testing.assert_array_equal(batch.numpy(), want)
host = Classifier.stack(rows)
assert isinstance(host, np.ndarray) and host.dtype == np.float32 and host.shape == (4, 3, 8, 8)
print("ok")
"""


def test_a_batch_of_device_tensors_and_numpy_rows_is_one_device_and_type():
    """An auto-batch of GPU-preprocessed image requests (paddle.Tensor rows) and v2 ``x`` requests (NumPy
    rows): CPU tensors stand in for the GPU's here."""
    import subprocess
    import sys
    from conftest import REPO_ROOT
    run = subprocess.run([sys.executable, "-c", _MIXED_STACK], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


def test_the_export_is_verified_once_per_load(scored_model_dir, monkeypatch):
    """The predictor verifies the export before loading it; the Classifier reuses that manifest instead
    of checking every file again, and verifies itself only for a predictor that verified nothing."""
    import rexnet_serving.classifier as classifier_module
    from rexnet_serving.integrity import verify_files
    calls = []

    def counting(model_dir):
        calls.append(model_dir)
        return verify_files(model_dir)

    monkeypatch.setattr(classifier_module, "verify_files", counting)
    loaded = Classifier(scored_model_dir)
    assert calls == [] and loaded.manifest.verified and loaded.manifest is loaded.model.manifest

    class Elsewhere:  # e.g. a test double: no manifest of its own
        def run(self, batch):
            return np.zeros((len(batch), SCORED_CLASSES), np.float32)

    other = Classifier(scored_model_dir, model=Elsewhere())
    assert calls == [scored_model_dir] and other.manifest.verified
