"""Runtime ``openvino``: OpenVINO on an exported model directory, the CPU runtime (interface: runtimes.base).

OpenVINO's Paddle frontend reads ``inference/inference.pdmodel`` + ``.pdiparams`` directly
(``openvino.Core().read_model``; no ONNX step, no second model file), and its CPU plugin runs ReXNet
about twice as fast as Paddle Inference with oneDNN on the same cores (issue 10; PaddleX's
high-performance inference picks OpenVINO on the CPU for the same reason).
https://docs.openvino.ai/2025/openvino-workflow/running-inference/inference-devices-and-modes/cpu-device.html

Precision is set explicitly: the CPU plugin's default ``INFERENCE_PRECISION_HINT`` is bf16 on a CPU with
AVX-512 BF16 (or AMX), which would silently change the scores. ``fp32`` (the default) matches Paddle
Inference to ~1e-7; ``bf16`` is opt-in and refused at load time on a CPU without BF16 support (where
OpenVINO would otherwise fall back to f32 without a word).

Threads: ``streams`` CPU streams (``NUM_STREAMS``) of ``cpu_threads`` threads each
(``INFERENCE_NUM_THREADS`` = their product), one compiled model. An infer request is not thread-safe:
``run`` holds a per-instance lock; ``clone()`` gives another infer request on the same compiled model
(weights and streams shared), which runs in parallel with the others up to ``streams`` at a time.

A lone pass: with one-thread streams (the derived layout on few cores, rexnet_serving.cpus) a request
that arrives alone would run on one thread while the others idle. So with several streams, a pass that
starts while no other pass of the model or its clones runs uses them all: several images are split
across the streams (one infer request each, run at once); one image, which cannot be split, runs on a
second model compiled for exactly one image on all the streams' threads (``lone_threads``, from
rexnet_serving.cpus.lone_image_threads). Under load every pass runs on its own stream. A static
one-image model is small (measured +78 MB for ReXNet_1_0, against ~130-330 MB for one more stream's
buffers) and faster at batch 1 than the dynamic one; an infer request costs only its input and output
tensors (a stream's buffers belong to the stream). Every path gives the same scores (the same weights and
precision; only the threads' split of the work differs).
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..cpus import lone_image_threads
from ..defaults import MAX_BATCH_IMAGES
from ..integrity import verify_files
from ..manifest import Manifest
from .base import check_batch_shape, check_runtime_options, model_files

# OpenVINO's element type names (``openvino.Type.get_type_name()``) for our precision names.
_HINTS = {"fp32": "f32", "bf16": "bf16"}
_NAMES = {hint: name for name, hint in _HINTS.items()}


@functools.lru_cache(maxsize=None)
def _core() -> Any:
    """One openvino.Core per process (it holds the loaded plugins)."""
    try:
        import openvino as ov
    except ImportError as exc:  # the GPU install has no OpenVINO
        raise RuntimeError(f"runtime openvino needs the openvino package ({exc}); install "
                           "rexnet-serving[cpu], or use runtime paddle") from None
    return ov.Core()


def cpu_capabilities() -> tuple:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. 'FP32', 'BF16', 'INT8') on this machine."""
    return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_bf16(capabilities: tuple) -> None:
    """RuntimeError unless the CPU plugin's capabilities include BF16 (else OpenVINO would quietly run
    f32 while the service claimed bf16)."""
    if "BF16" not in capabilities:
        raise RuntimeError("precision bf16 needs a CPU with BF16 support (AVX-512 BF16 or AMX); this "
                           f"CPU's OpenVINO capabilities are {', '.join(capabilities)}: use precision fp32")


class _Passes:
    """What a model and its clones share: how many of their passes run now; and what only a pass that
    starts alone may use: the one-image model's infer request (None without one) and ``spare`` infer
    requests on the streams, one per stream but the pass's own."""

    def __init__(self, compiled: Any, streams: int, lone: Any = None, output_name: str = "") -> None:
        self._lock = threading.Lock()
        self._running = 0
        self.spare = [compiled.create_infer_request() for _ in range(streams - 1)]
        self.lone_request = lone.create_infer_request() if lone is not None else None
        self.lone_output = lone.output(output_name) if lone is not None else None

    def start(self) -> bool:
        """Count a pass in; True when it is alone (no other pass of the model or its clones runs)."""
        with self._lock:
            self._running += 1
            return self._running == 1

    def end(self) -> None:
        with self._lock:
            self._running -= 1


class OpenVinoModel:
    """An OpenVINO CPU predictor on an exported model directory.

    ``run(batch)`` takes float32 [N, 3, S, S] (NumPy, or a ``paddle.Tensor``, which is copied to the
    host; 1 <= N <= max_batch) and returns float32 [N, class_num]: probabilities when the export appended
    a softmax (``manifest.softmax``), else logits. ``precision`` is what the compiled model really runs
    in (read back from it); ``lone_threads`` the threads of the one-image model (0: none; see above).
    """

    runtime = "openvino"
    device = "cpu"

    def __init__(self, model_dir: Union[str, Path], precision: str = "fp32", cpu_threads: int = 2,
                 streams: int = 1, max_batch: int = MAX_BATCH_IMAGES, lone_threads: Optional[int] = None) -> None:
        check_runtime_options(self.runtime, precision, self.device)
        if precision == "bf16":
            check_bf16(cpu_capabilities())
        for name, value in (("cpu_threads", cpu_threads), ("streams", streams), ("max_batch", max_batch)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if lone_threads is not None and lone_threads < 0:
            raise ValueError(f"lone_threads must be >= 0 (0: none), got {lone_threads}")
        self.manifest: Manifest = verify_files(model_dir)  # refuses damaged or old exports
        self.max_batch = max_batch
        self.lone_threads = lone_image_threads(streams, cpu_threads) if lone_threads is None else lone_threads
        model_file, params_file = model_files(self.manifest)
        # The weights file is named, not left to the frontend to find beside the program by name: both
        # are the paths verify_files checked. The program's feed is [-1, 3, S, S]: the batch stays
        # dynamic (1..max_batch is checked in run).
        program = _core().read_model(str(model_file), str(params_file))
        lone = None
        if self.lone_threads:  # read once: the one-image model is a reshaped copy of the same program
            single = program.clone()
            single.reshape([1, 3, self.manifest.input_size, self.manifest.input_size])
            lone = self._compile(single, precision, 1, self.lone_threads)
        self._compiled = self._compile(program, precision, streams, cpu_threads * streams)
        self.precision = _NAMES[self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()]
        self._output = self._compiled.output(self.manifest.fetch.name)
        self._passes = _Passes(self._compiled, streams, lone, self.manifest.fetch.name)
        self._init()

    @staticmethod
    def _compile(program: Any, precision: str, streams: int, threads: int) -> Any:
        """``program`` compiled for the CPU in ``precision`` (RuntimeError if OpenVINO picked another)."""
        compiled = _core().compile_model(program, "CPU", {"INFERENCE_PRECISION_HINT": _HINTS[precision],
                                                          "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": threads})
        used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if used != _HINTS[precision]:
            raise RuntimeError(f"OpenVINO compiled the model in {used}, not the requested {precision}")
        return compiled

    def _init(self) -> None:
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def clone(self) -> "OpenVinoModel":
        """A copy for another thread: the same compiled models, its own infer request and lock."""
        twin = object.__new__(OpenVinoModel)
        twin.manifest, twin.max_batch, twin.precision = self.manifest, self.max_batch, self.precision
        twin.lone_threads, twin._compiled, twin._output, twin._passes = (
            self.lone_threads, self._compiled, self._output, self._passes)
        twin._init()
        return twin

    def run(self, batch: Any) -> np.ndarray:
        """Float32 [N, class_num] outputs for an NCHW float32 ``batch``."""
        if not isinstance(batch, np.ndarray) and hasattr(batch, "numpy"):
            batch = batch.numpy()  # a paddle.Tensor: one copy to the host
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        check_batch_shape(self.manifest, self.max_batch, batch.shape)
        passes = self._passes
        with self._lock:
            alone = passes.start()
            try:
                if alone and len(batch) == 1 and passes.lone_request is not None:
                    return self._infer(passes.lone_request, passes.lone_output, batch)
                if alone and len(batch) > 1 and passes.spare:
                    return self._split(batch, [self._request, *passes.spare])
                return self._infer(self._request, self._output, batch)
            finally:
                passes.end()

    def warm_up(self, batch: Any) -> None:
        """``batch`` (a full one) on every stream at once, and its first image on the one-image model:
        each claims its buffers now, as under load, instead of on the first large pass while serving.
        ``run`` cannot do it: a pass that starts alone is split across the streams. Shared with the
        clones, so once per model is enough."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        check_batch_shape(self.manifest, self.max_batch, batch.shape)
        passes = self._passes
        with self._lock:
            passes.start()
            try:
                requests = [self._request, *passes.spare]
                self._at_once(requests, [batch] * len(requests))
                if passes.lone_request is not None:
                    self._infer(passes.lone_request, passes.lone_output, batch[:1])
            finally:
                passes.end()

    @staticmethod
    def _infer(request: Any, output: Any, batch: np.ndarray) -> np.ndarray:
        # share_inputs: OpenVINO reads the array in place; the outputs are copied (the default), so the
        # next run cannot overwrite a result a caller still holds.
        return np.asarray(request.infer({0: batch}, share_inputs=True)[output])

    def _split(self, batch: np.ndarray, requests: list) -> np.ndarray:
        """``batch`` in about equal parts on ``requests`` (each on its own stream), all at once."""
        parts = np.array_split(batch, min(len(requests), len(batch)))  # views, still C-contiguous
        used = requests[:len(parts)]
        self._at_once(used, parts)
        return np.concatenate([request.get_tensor(self._output).data for request in used])

    @staticmethod
    def _at_once(requests: list, batches: list) -> None:
        """Each batch on its request, all started before any is waited for (each runs on a stream)."""
        try:
            for request, batch in zip(requests, batches):
                request.start_async({0: batch}, share_inputs=True)
        finally:
            for request in requests:
                request.wait()
