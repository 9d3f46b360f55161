"""Runtime ``paddle``: Paddle Inference on an exported model directory (CPU with oneDNN, GPU, TensorRT FP16).

Built by rexnet_serving.runtimes.load_model; the interface is rexnet_serving.runtimes.base's.

Reads ``manifest.json`` for the feed/fetch names and the input size, builds a ``paddle.inference``
predictor on ``inference/inference.pdmodel`` + ``.pdiparams`` (Paddle Inference 2.6 Python API,
https://www.paddlepaddle.org.cn/inference/master/api_reference/python_api_doc/Config_index.html) and
runs NCHW float32 batches.

Threads: a Paddle Inference predictor is not thread-safe. ``run`` holds a per-instance lock, so one
instance may be shared but serialises its callers; for parallel inference give each thread its own
``clone()`` (``predictor.clone()`` shares the weights, not the scratch memory).

Device tensors: a ``paddle.Tensor`` batch is bound to the predictor's input with
``Tensor.share_external_data`` (no copy, no trip through host memory when it already lives on the
predictor's device; the predictor only reads it). ``predictor.run([paddle.Tensor])``, the other zero-copy API, crashes in Paddle
2.6.2 while converting its outputs back to Python (SIGSEGV in ``ToPyObject``), so it is not used.
Only the [N, class_num] result is copied to the host.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import paddle
from paddle import inference as paddle_infer

from ..defaults import MAX_BATCH_IMAGES
from ..integrity import verify_files
from ..manifest import Manifest
from .base import check_batch_shape, model_files

DEVICES = ("cpu", "gpu")
GPU_MEMORY_POOL_MB = 256  # initial pool; Paddle grows it on demand
MKLDNN_CACHE_CAPACITY = 16  # oneDNN caches kernels per input shape: bound it for varying batch sizes
TRT_WORKSPACE = 1 << 30
TRT_MIN_SUBGRAPH = 3

Batch = Union[np.ndarray, paddle.Tensor]


def _build_config(manifest: Manifest, device: str, gpu_id: int, cpu_threads: int, mkldnn: bool,
                  trt_fp16: bool, max_batch: int) -> Any:
    model_file, params_file = model_files(manifest)
    config = paddle_infer.Config(str(model_file), str(params_file))
    config.switch_ir_optim(True)
    config.enable_memory_optim()
    config.disable_glog_info()
    if device == "cpu":
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(cpu_threads)
        if mkldnn:
            config.enable_mkldnn()
            config.set_mkldnn_cache_capacity(MKLDNN_CACHE_CAPACITY)
        else:
            config.disable_mkldnn()
        return config
    # GPU (untested here: no GPU on the build machine).
    if not paddle.is_compiled_with_cuda():
        raise RuntimeError("device='gpu' needs paddlepaddle-gpu (this Paddle is a CPU build)")
    config.enable_use_gpu(GPU_MEMORY_POOL_MB, gpu_id)
    if trt_fp16:
        config.enable_tensorrt_engine(workspace_size=TRT_WORKSPACE, max_batch_size=max_batch,
                                      min_subgraph_size=TRT_MIN_SUBGRAPH,
                                      precision_mode=paddle_infer.PrecisionType.Half,
                                      use_static=False, use_calib_mode=False)
        size = manifest.input_size
        name = manifest.feed.name
        config.set_trt_dynamic_shape_info({name: [1, 3, size, size]},
                                          {name: [max_batch, 3, size, size]},
                                          {name: [max(1, max_batch // 2), 3, size, size]})
    return config


class InferenceModel:
    """A Paddle Inference predictor on an exported model directory.

    ``run(batch)`` takes float32 [N, 3, S, S] (NumPy or ``paddle.Tensor``, 1 <= N <= max_batch, S
    the manifest's input size) and returns float32 [N, class_num]: probabilities when the export
    appended a softmax (``manifest.softmax``), else logits.

    One instance may be shared by threads (``run`` holds a lock, so they take turns); for parallel
    inference give each thread ``clone()``. On the CPU the default ``mkldnn=True`` (oneDNN) measured
    ~1.7x faster at batch 1 and ~6x at batch 8 than Paddle's native kernels for ReXNet_1_0.
    """

    runtime = "paddle"

    def __init__(self, model_dir: Union[str, Path], device: str = "cpu", gpu_id: int = 0,
                 cpu_threads: int = 2, mkldnn: bool = True, trt_fp16: bool = False,
                 max_batch: int = MAX_BATCH_IMAGES) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        if cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {cpu_threads}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.manifest: Manifest = verify_files(model_dir)  # refuses damaged or old exports
        self.device = device
        self.gpu_id = gpu_id
        self.max_batch = max_batch
        self.precision = "fp16" if trt_fp16 and device == "gpu" else "fp32"
        config = _build_config(self.manifest, device, gpu_id, cpu_threads, mkldnn, trt_fp16,
                               max_batch)
        self._init(paddle_infer.create_predictor(config))

    def _init(self, predictor: Any) -> None:
        self._predictor = predictor
        self._lock = threading.Lock()
        self._input = predictor.get_input_handle(self.manifest.feed.name)
        self._bound: Optional[paddle.Tensor] = None
        self._output = predictor.get_output_handle(self.manifest.fetch.name)

    def clone(self) -> "InferenceModel":
        """A copy for another thread: same weights, its own predictor state and lock."""
        twin = object.__new__(InferenceModel)
        twin.manifest, twin.device, twin.gpu_id, twin.max_batch, twin.precision = (
            self.manifest, self.device, self.gpu_id, self.max_batch, self.precision)
        with self._lock:
            predictor = self._predictor.clone()
        twin._init(predictor)
        return twin

    def _as_input(self, batch: Batch) -> paddle.Tensor:
        """``batch`` as a contiguous float32 tensor on the predictor's device (no copy when it
        already is one)."""
        place = paddle.CPUPlace() if self.device == "cpu" else paddle.CUDAPlace(self.gpu_id)
        if not isinstance(batch, paddle.Tensor):
            return paddle.to_tensor(np.ascontiguousarray(batch, dtype=np.float32), place=place)
        tensor = batch
        if self.device == "cpu" and not tensor.place.is_cpu_place():
            tensor = tensor.cpu()
        elif self.device == "gpu" and not (tensor.place.is_gpu_place()
                                           and tensor.place.gpu_device_id() == self.gpu_id):
            tensor = tensor.cuda(self.gpu_id)  # untested here (no GPU)
        if tensor.dtype != paddle.float32:
            tensor = tensor.astype("float32")  # on its device
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        return tensor

    def run(self, batch: Batch) -> np.ndarray:
        """Float32 [N, class_num] outputs for an NCHW float32 ``batch``."""
        if not isinstance(batch, paddle.Tensor):
            batch = np.asarray(batch)
        check_batch_shape(self.manifest, self.max_batch, batch.shape)
        tensor = self._as_input(batch)
        with self._lock:
            # Every run binds its input with share_external_data, NumPy batches included (their one
            # host copy is paddle.to_tensor instead of copy_from_cpu): copy_from_cpu after a shared
            # run would write into the previous caller's (possibly freed) buffer.
            self._input.share_external_data(tensor)
            # Keep the bound tensor alive until the next run rebinds the input, so the predictor
            # never holds a dangling pointer.
            self._bound = tensor
            self._predictor.run()
            return self._output.copy_to_cpu()
