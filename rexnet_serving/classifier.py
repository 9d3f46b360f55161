"""The offline predictor: encoded images -> decode -> preprocess -> infer -> top-k, as plain functions.

The same stage functions run in the Pipeline service's ops (rexnet_pipelines.ops), the bRPC endpoint
and the benchmarks, so what the service answers equals what ``Classifier.classify`` answers on the same
bytes. The stages follow PaddleClas's Python deploy predictor (deploy/python/predict_cls.py): decode to
RGB, the eval preprocessing written down in the export's manifest, inference (Paddle Inference or
OpenVINO), Topk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import postprocess
from .defaults import MAX_BATCH_IMAGES, device_of
from .imageio import DecodeLimits, ImageError, check_request, decode_image, decode_jpeg_on_device
from .integrity import verify_files
from .manifest import Manifest
from .preprocess import PreprocessConfig, preprocess, preprocess_opencv
from .results import ImageResult

Payload = Union[bytes, str]  # encoded image bytes, or the same as base64 text
Decoded = Any                # H x W x 3 uint8 RGB: np.ndarray, or paddle.Tensor on the GPU


def decode_file(data: bytes, limits: DecodeLimits = DecodeLimits(), on_device: bool = False) -> Decoded:
    """One image from its encoded file; ImageError when refused.

    ``on_device``: try nvJPEG on the current GPU first (rexnet_serving.imageio.decode_jpeg_on_device),
    falling back to OpenCV on the CPU for anything it does not take.
    """
    if on_device:
        tensor = decode_jpeg_on_device(data, limits)
        if tensor is not None:
            return tensor
    return decode_image(data, limits)


def decode_payloads(payloads: Sequence[Payload], limits: DecodeLimits = DecodeLimits(),
                    on_device: bool = False) -> Tuple[List[Decoded], Dict[int, ImageError]]:
    """Decode every image of a request: the decoded ones in order, and the refused ones by index.

    One bad image never stops the others: each gets its own error entry in the result. The request as
    a whole is checked first (rexnet_serving.imageio.check_request: image count and summed pixels, from
    the headers): RequestTooLargeError, before any image is decoded, when it is over the budget.
    """
    files = check_request(payloads, limits)  # base64 text is decoded here, once
    images: List[Decoded] = []
    errors: Dict[int, ImageError] = {}
    for index, data in enumerate(files):
        files[index] = None  # each file goes as soon as it is decoded
        if isinstance(data, ImageError):
            errors[index] = data
            continue
        try:
            images.append(decode_file(data, limits, on_device))
        except ImageError as exc:
            errors[index] = exc
    return images, errors


def preprocess_images(images: Sequence[Decoded], cfg: PreprocessConfig, on_device: bool = False) -> Any:
    """The model's eval preprocessing, [N, 3, crop, crop] float32, where the inference runs.

    ``on_device`` False (CPU inference): OpenCV on the host, a NumPy batch (preprocess_opencv, over 10x cheaper
    there than Paddle ops). True (GPU inference): Paddle ops on the current device, a tensor that never
    leaves it (preprocess). Both are checked against the same PaddleClas reference in the tests.
    """
    if on_device:
        return preprocess(list(images), cfg)
    return preprocess_opencv(list(images), cfg)


def results_for(count: int, probs: np.ndarray, errors: Dict[int, ImageError], k: int,
                labels: Sequence[str]) -> List[ImageResult]:
    """Top-k for the decoded images' rows of ``probs`` and the errors slotted back in request order."""
    predictions = postprocess.top_k(probs, k, labels) if len(probs) else []
    return postprocess.assemble(count, predictions, errors)


def inference_model_options(device_type: int = 0, devices: str = "", thread_num: int = 2,
                            use_mkldnn: bool = True, precision: str = "fp32", max_batch: int = MAX_BATCH_IMAGES,
                            runtime: Optional[str] = None, concurrency: int = 1) -> Dict[str, Any]:
    """rexnet_serving.runtimes.load_model keyword arguments from Paddle Serving's local_service_conf keys
    (and the op's ``concurrency``: infer threads, each with its own predictor clone).

    ``precision`` passes through: fp16 is TensorRT FP16 (device_type 2, runtime paddle), bf16 is
    OpenVINO's; load_model refuses what cannot run. ``concurrency`` becomes OpenVINO's stream count, so
    every infer thread's request runs at once with ``thread_num`` threads, as Paddle's clones do.
    """
    gpu_id = int((devices or "0").split(",")[0].strip())
    return {"runtime": runtime, "precision": precision, "device": device_of(device_type),
            "gpu_id": gpu_id, "cpu_threads": thread_num, "mkldnn": use_mkldnn and device_type == 0,
            "max_batch": max_batch, "streams": concurrency}


class Classifier:
    """An exported model ready to classify: ``classify(images, top_k)`` end to end, or stage by stage.

    ``model`` is a predictor (rexnet_serving.runtimes.base); by default one is built from ``model_dir`` by
    rexnet_serving.runtimes.load_model with ``model_options`` (see inference_model_options).
    """

    def __init__(self, model_dir: Union[str, Path], limits: DecodeLimits = DecodeLimits(),
                 model: Any = None, **model_options: Any) -> None:
        from .runtimes import load_model
        self.model = model if model is not None else load_model(model_dir, **model_options)
        # Also with a remote ``model``: labels and preprocessing come from these files.
        self.manifest: Manifest = self._verified(model_dir)
        self.labels: List[str] = self.manifest.labels()
        self.limits = limits
        self.on_device = str(model_options.get("device", "cpu")).startswith("gpu")

    def _verified(self, model_dir: Union[str, Path]) -> Manifest:
        """The export's verified manifest: the predictor's own when it verified this directory (every
        loader calls verify_files before it loads anything), so the files are checked once per load;
        else (a predictor from elsewhere) verify_files now."""
        manifest = getattr(self.model, "manifest", None)
        if (isinstance(manifest, Manifest) and manifest.verified and manifest.model_dir is not None
                and Path(manifest.model_dir).resolve() == Path(model_dir).resolve()):
            return manifest
        return verify_files(model_dir)

    @property
    def class_num(self) -> int:
        return self.manifest.class_num

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self.manifest.preprocess

    def decode(self, payloads: Sequence[Payload]) -> Tuple[List[Decoded], Dict[int, ImageError]]:
        return decode_payloads(payloads, self.limits, self.on_device)

    def preprocess(self, images: Sequence[Decoded]) -> Any:
        return preprocess_images(images, self.manifest.preprocess, self.on_device)

    @staticmethod
    def stack(images: Sequence[Any]) -> Any:
        """Per-image [3, S, S] float32 rows back into one batch, where they are: np.stack when every row is
        NumPy; else one paddle.Tensor on the device of the first tensor row.

        One auto-batch may mix both (a GPU service's preprocessed images are device tensors, the v2 ``x``
        input's rows NumPy): every row is made a float32 tensor on that device first, because
        paddle.stack of a Tensor and an ndarray is a SIGSEGV in Paddle 2.6.2, which kills the service.
        """
        if all(isinstance(row, np.ndarray) for row in images):
            return np.stack(images)
        import paddle
        place = next(row.place for row in images if isinstance(row, paddle.Tensor))
        def on_place(row: Any) -> Any:
            if isinstance(row, np.ndarray):
                return paddle.to_tensor(np.asarray(row, np.float32), place=place)
            if row.dtype != paddle.float32 or str(row.place) != str(place):
                return paddle.to_tensor(row, dtype="float32", place=place)
            return row

        return paddle.stack([on_place(row) for row in images])

    def probabilities(self, batch: Any, model: Any = None) -> np.ndarray:
        """Class probabilities [N, C] for a preprocessed batch (softmax here when the export has none).

        ``model``: another predictor for the same export (a clone for another thread).
        """
        if len(batch) == 0:
            return np.zeros((0, self.class_num), np.float32)
        out = np.asarray((model or self.model).run(batch))
        return out if self.manifest.softmax else postprocess.softmax(out)

    def results(self, count: int, probs: np.ndarray, errors: Dict[int, ImageError],
                k: int) -> List[ImageResult]:
        return results_for(count, probs, errors, k, self.labels)

    def classify(self, payloads: Sequence[Payload], top_k: int = 5) -> List[ImageResult]:
        """Encoded images (or base64 text) -> one result per image, in order."""
        images, errors = self.decode(payloads)
        probs = self.probabilities(self.preprocess(images)) if images else self.probabilities([])
        return self.results(len(payloads), probs, errors, top_k)

    def classify_arrays(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities [N, C] for already decoded RGB arrays (the reference the tests compare with)."""
        return self.probabilities(self.preprocess(images))
