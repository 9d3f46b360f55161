"""Everything that touches Paddle Serving's Pipeline internals, in one place.

Paddle Serving 0.9.0's DAG carries dicts through its channels, takes "the request message" in
``DAGExecutor.call`` and hands hook tuples between an op's ``preprocess`` (``(data, is_skip, err_no,
err_msg)``), ``process`` (``(data, err_no, err_msg)``) and ``postprocess``. Some of what this service
needs has no public API at all (the built DAG executor, the parsed config, the auto-batching hook).
This module adapts all of it, so that the ops (rexnet_pipelines.ops) are typed stage code and the front
doors deal only in rexnet_pipelines.request's ClassifyRequest / ClassifyAnswer:

* in: ``DAGExecutor.call(request)`` passes its argument untouched to the request op's
  ``unpack_request_package``, so the ClassifyRequest itself is the "message" (:class:`TypedRequestOp`);
  every channel dict holds one item under :data:`ITEM` (the request, then the prepared request);
* out: the response op's ``pack_response_package`` return value is what ``DAGExecutor.call`` returns,
  so :class:`TypedResponseOp` returns the ClassifyAnswer (refusals from Paddle's error codes included);
* ops: :class:`StageOp` (per-request work, no ``process``) and :class:`BatchingOp` (one ``process``
  per auto-batch of images, formed by rexnet_pipelines.batcher.Batcher through the private
  ``_auto_batching_generator`` hook); a stage refuses a request by raising :class:`Refused`;
* start: :func:`start_dag` builds Paddle's PipelineServer from the config dict and returns its DAG
  executor and its checked config (private ``_server``, ``_conf``, ``_response_op`` and
  ``_dag_executor``: PipelineServer offers no other way to get a DAG without its own gRPC server).

tests/test_paddle_adapter.py asserts that every private name and signature used here still exists on
the installed paddle_serving_server, so an upgrade that changes them fails there, not in production.
"""
from __future__ import annotations

import logging
import queue
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from paddle_serving_server.pipeline import Op, PipelineServer, RequestOp, ResponseOp
from paddle_serving_server.pipeline.channel import ChannelDataErrcode, ChannelDataType, ChannelTimeoutError
from paddle_serving_server.pipeline.pipeline_server import PipelineServicer
from paddle_serving_server.web_service import WebService

from . import metrics
from .batcher import Batcher
from .request import BACKEND_ERROR, ClassifyAnswer, ClassifyRequest

log = logging.getLogger("rexnet_serve")
ITEM = "item"   # the one key of every channel dict: the request (or what a stage made of it)
_FEED = "x"     # the batching op's feed: an object array of per-image tensors ...
_KEYS = "keys"  # ... and, in step, the key (model) each image goes to
_ROWS = "rows"  # its output: one row per image, in feed order
_POLL = 1e-9    # ThreadChannel.front timeout that only looks (0 would mean "wait forever")


class Refused(Exception):
    """A stage refuses the request: ``status`` (rexnet_pipelines.request) and why, in words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class TypedRequestOp(RequestOp):
    """The DAG's entry: the ClassifyRequest handed to ``DAGExecutor.call`` becomes the channel item.

    (The stock RequestOp would parse Paddle's protobuf message and ``np.load(allow_pickle=True)`` byte
    tensors; nothing here interprets anything: the front doors built the request.)"""

    def unpack_request_package(self, request: ClassifyRequest) -> Tuple[Dict[str, Any], int, Optional[int], str]:
        return {ITEM: request}, request.log_id, None, ""


class StageOp(Op):
    """An op with per-request work only: ``work(item) -> item`` in its ``preprocess`` hook (Paddle
    Serving runs an op's ``preprocess`` for each request in the op's threads, in parallel)."""

    def work(self, item: Any) -> Any:
        raise NotImplementedError

    def preprocess(self, input_dicts: Dict[str, Any], data_id: int = 0, log_id: int = 0) -> Tuple:
        (data,) = input_dicts.values()
        try:
            return {ITEM: self.work(data[ITEM])}, True, None, ""
        except Refused as exc:
            return None, True, exc.status, exc.message


class _ChannelQueue:
    """Paddle Serving's ThreadChannel as a rexnet_pipelines.batcher.BatchQueue."""

    def __init__(self, channel: Any, op_name: str) -> None:
        self.channel, self.op_name = channel, op_name

    def take(self, timeout: Optional[float]) -> Any:
        if timeout is None:
            return self.channel.front(self.op_name)
        try:  # front's timeout 0 would mean "wait forever": look with _POLL instead
            return self.channel.front(self.op_name, max(timeout, _POLL))
        except ChannelTimeoutError:
            raise queue.Empty from None


class BatchingOp(Op):
    """An op that runs the images of every request of an auto-batch together.

    Subclasses give ``images(item) -> (per-image tensors, key)`` (per request; raise Refused to drop
    it), ``forward(images, keys) -> rows`` (per auto-batch: one output row per image; raise Refused to
    fail the whole auto-batch) and ``collect(item, rows) -> item`` (per request, its own rows), and
    ``preparing() -> int`` for the batcher's wait policy. Paddle Serving merges the requests' feeds with
    ``np.append`` and splits the outputs by each feed's length: object arrays of per-image tensors
    merge without copying them (or off the device).
    """

    def images(self, item: Any) -> Tuple[Sequence[Any], str]:
        raise NotImplementedError

    def forward(self, images: List[Any], keys: List[str]) -> np.ndarray:
        raise NotImplementedError

    def collect(self, item: Any, rows: List[Any]) -> Any:
        raise NotImplementedError

    def preparing(self) -> int:
        return 0

    def init_from_dict(self, conf: Dict[str, Any]) -> None:
        super().init_from_dict(conf)
        # Paddle Serving skips `process` for an op without its own model_config; ours brings its model.
        self.with_serving = True

    def init_client(self, client_config: Any, server_endpoints: Any) -> Any:
        return self  # the model is loaded before the DAG starts (a load error exits cleanly)

    def _auto_batching_generator(self, input_channel: Any, op_name: str, batch_size: int,
                                 timeout: Optional[float], op_info_prefix: str) -> Any:
        """Paddle Serving's hook for forming auto-batches (operator.py ``_run``), replaced by
        rexnet_pipelines.batcher.Batcher: its wait policy never makes a lone request wait."""
        batcher = Batcher(batch_size, timeout, self.preparing)
        source = _ChannelQueue(input_channel, op_name)
        while True:
            batch = batcher.next_batch(source)
            metrics.BATCH_WAIT.observe(batch.waited)
            yield batch.items

    def preprocess(self, input_dicts: Dict[str, Any], data_id: int = 0, log_id: int = 0) -> Tuple:
        (data,) = input_dicts.values()
        try:
            images, key = self.images(data[ITEM])
        except Refused as exc:
            return None, False, exc.status, exc.message
        feed, keys = np.empty(len(images), dtype=object), np.empty(len(images), dtype=object)
        for i, image in enumerate(images):
            feed[i], keys[i] = image, key
        return {_FEED: feed, _KEYS: keys}, False, None, ""

    def process(self, feed_batch: List[Dict[str, Any]], typical_logid: int = 0) -> Tuple:
        try:
            rows = self.forward(list(feed_batch[0][_FEED]), list(feed_batch[0][_KEYS]))
        except Refused as exc:
            return {}, exc.status, exc.message
        return {_ROWS: rows}, 0, ""

    def postprocess(self, input_data: Dict[str, Any], fetch_data: Dict[str, Any], data_id: int = 0,
                    log_id: int = 0) -> Tuple:
        (data,) = input_data.values()
        return {ITEM: self.collect(data[ITEM], list(fetch_data[_ROWS]))}, None, ""


class TypedResponseOp(ResponseOp):
    """The DAG's exit: ``answer(item) -> ClassifyAnswer`` for a request that went through, a refusal
    built from Paddle Serving's error codes otherwise. Paddle Serving runs it in the thread that called
    ``DAGExecutor.call`` (the front door's), so whatever ``answer`` does costs no op hop."""

    def answer(self, item: Any) -> ClassifyAnswer:
        raise NotImplementedError

    def pack_response_package(self, channeldata: Any) -> ClassifyAnswer:
        if channeldata.error_code == ChannelDataErrcode.OK.value:
            if channeldata.datatype != ChannelDataType.DICT.value:
                return ClassifyAnswer.refused(ChannelDataErrcode.TYPE_ERROR.value,
                                              f"error type({channeldata.datatype}) in datatype.")
            try:
                return self.answer(channeldata.dictdata[ITEM])
            except Exception as exc:  # Paddle Serving would answer its own Response message instead
                log.exception("building the answer failed")
                return ClassifyAnswer.refused(ChannelDataErrcode.RPC_PACKAGE_ERROR.value, f"rpc package error: {exc}")
        if channeldata.error_code == ChannelDataErrcode.PRODUCT_ERROR.value:  # raised by our stages
            return ClassifyAnswer.refused(channeldata.prod_error_code, channeldata.prod_error_info)
        status, message = channeldata.error_code, channeldata.error_info
        if status == BACKEND_ERROR:
            message = backend_error_message(message)
        return ClassifyAnswer.refused(status, message)


def backend_error_message(paddle_message: str) -> str:
    """Our message out of Paddle Serving 0.9.0's wrapping of a failed ``process`` (operator.py
    _run_process: "[infer] failed to predict. <ours>. Please check the input dict and ..."), whose
    advice to check the input is wrong for a backend outage."""
    _, found, rest = paddle_message.partition("] failed to predict. ")
    message, found_end, _ = rest.rpartition(". Please check the input dict")
    return f"inference failed: {message}" if found and found_end else paddle_message


def classify(dag_executor: Any, request: ClassifyRequest) -> ClassifyAnswer:
    """``request`` through the DAG (in the calling thread until the response op has answered)."""
    return dag_executor.call(request)


class _WebService(WebService):
    """WebService's config handling (Paddle's yaml checks, op configs) with our two end ops: its own
    ``prepare_pipeline_config`` hard-wires the stock RequestOp/ResponseOp."""

    def __init__(self, name: str, build: Callable[[RequestOp], Op],
                 response_op: Callable[[List[Op]], ResponseOp]) -> None:
        super().__init__(name=name)
        self._build, self._response_op = build, response_op

    def get_pipeline_response(self, read_op: Any) -> Any:
        return self._build(read_op)

    def prepare_pipeline_config(self, yml_file: Optional[str] = None, yml_dict: Optional[dict] = None) -> None:
        last_op = self.get_pipeline_response(TypedRequestOp())
        self._server.set_response_op(self._response_op([last_op]))
        self._server.prepare_server(yml_file=yml_file, yml_dict=yml_dict)


def start_dag(name: str, build: Callable[[RequestOp], Op], response_op: Callable[[List[Op]], ResponseOp],
              paddle_conf: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """Build and start the DAG (its op threads): ``build(request_op)`` returns the last op before the
    response op, ``response_op([last_op])`` the response op. Returns the DAG executor (``classify``
    takes it) and Paddle's checked config (defaults filled in). SystemExit when Paddle Serving refuses
    the config (it exits on a bad one)."""
    service = _WebService(name, build, response_op)
    service.prepare_pipeline_config(yml_dict=paddle_conf)
    server: PipelineServer = service._server
    conf = server._conf
    # Paddle's servicer builds and starts the DAG (op threads); its gRPC method is not used.
    return PipelineServicer(name, server._response_op, conf)._dag_executor, conf
