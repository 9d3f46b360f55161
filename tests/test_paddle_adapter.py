"""rexnet_pipelines.paddle_adapter against the installed Paddle Serving: the private names and signatures
it relies on still exist (an upgrade that changes them fails here), and a real DAG built by start_dag
carries the typed request in and the typed answer out, refusals and a failed auto-batch included."""
from __future__ import annotations

import inspect
from typing import Any, Iterator, List, Tuple

import numpy as np
import pytest

from conftest import free_port


@pytest.fixture(scope="module")
def paddle(tmp_path_factory: Any) -> Iterator[Any]:
    """Paddle Serving's pipeline package, with its files in a scratch directory: it writes logs into the
    cwd of its first import and ProcessInfo.json into its CONF_HOME (also fixed at import) on start."""
    scratch = tmp_path_factory.mktemp("paddle_home")
    mp = pytest.MonkeyPatch()
    mp.chdir(scratch)
    import paddle_serving_server.pipeline as pipeline
    import paddle_serving_server.util as util
    mp.setattr(util, "CONF_HOME", str(scratch))
    yield pipeline
    mp.undo()


def _params(function: Any) -> List[str]:
    return list(inspect.signature(function).parameters)


def test_the_private_shape_the_adapter_relies_on_is_there(paddle: Any):
    from paddle_serving_server.pipeline.channel import ChannelData, ChannelDataErrcode, ChannelDataType, ThreadChannel
    from paddle_serving_server.pipeline.dag import DAGExecutor
    from paddle_serving_server.pipeline.pipeline_server import PipelineServicer
    from paddle_serving_server.web_service import WebService

    op = paddle.Op
    assert _params(op._auto_batching_generator) == ["self", "input_channel", "op_name", "batch_size", "timeout",
                                                    "op_info_prefix"]
    assert _params(op.init_client) == ["self", "client_config", "server_endpoints"]
    assert _params(op.init_from_dict) == ["self", "conf"]
    assert _params(op.preprocess)[:2] == ["self", "input_dicts"]
    assert _params(op.process)[:2] == ["self", "feed_batch"]
    assert _params(op.postprocess)[:3] == ["self", "input_data", "fetch_data"]
    assert "with_serving" in inspect.getsource(op.init_from_dict)
    assert _params(paddle.RequestOp.unpack_request_package) == ["self", "request"]
    assert _params(paddle.ResponseOp.pack_response_package) == ["self", "channeldata"]
    assert _params(DAGExecutor.call) == ["self", "rpc_request"]
    assert _params(PipelineServicer.__init__)[:4] == ["self", "name", "response_op", "dag_conf"]
    assert "self._dag_executor" in inspect.getsource(PipelineServicer.__init__)
    assert "self._server" in inspect.getsource(WebService.__init__)
    assert _params(WebService.prepare_pipeline_config) == ["self", "yml_file", "yml_dict"]
    assert "self._conf" in inspect.getsource(paddle.PipelineServer.prepare_server)
    assert "self._response_op" in inspect.getsource(paddle.PipelineServer.set_response_op)
    assert {"prod_error_code", "prod_error_info", "error_code", "error_info", "dictdata"} <= set(
        _params(ChannelData.__init__))
    assert ChannelDataErrcode.PRODUCT_ERROR and ChannelDataErrcode.TYPE_ERROR and ChannelDataType.DICT
    assert _params(ThreadChannel.front)[:3] == ["self", "op_name", "timeout"]


@pytest.fixture(scope="module")
def dag(paddle: Any) -> Iterator[Any]:
    """A real DAG: a stage that refuses model "refuse", a batching op that sums each image's bytes and
    fails the auto-batch for model "backend-down", and a response op that reports what it got (and fails
    for model "broken-answer")."""
    from rexnet_pipelines.paddle_adapter import BatchingOp, Refused, StageOp, TypedResponseOp, start_dag
    from rexnet_pipelines.request import BACKEND_ERROR, ClassifyAnswer

    class Check(StageOp):
        def work(self, item: Any) -> Any:
            if item.model == "refuse":
                raise Refused(51, "invalid_request: refused by the stage")
            return item

    class Sum(BatchingOp):
        def images(self, item: Any) -> Tuple[List[Any], str]:
            return list(item.images), item.model

        def forward(self, images: List[Any], keys: List[str]) -> np.ndarray:
            if "backend-down" in keys:
                raise Refused(BACKEND_ERROR, "the backend is down")
            rows = np.empty(len(images), dtype=object)
            rows[:] = [float(sum(image)) for image in images]
            return rows

        def collect(self, item: Any, rows: List[Any]) -> Any:
            return item, rows

    class Answer(TypedResponseOp):
        def answer(self, item: Any) -> Any:
            request, rows = item
            if request.model == "broken-answer":
                raise RuntimeError("no answer")
            return ClassifyAnswer(model=request.model, probs=np.asarray(rows, np.float32))

    conf = {"rpc_port": free_port(), "http_port": free_port(), "worker_num": 1, "dag": {"is_thread_op": True},
            "op": {"check": {"concurrency": 1}, "sum": {"concurrency": 1, "batch_size": 4}}}
    executor, checked = start_dag(
        "adapter-test", lambda first: Sum(name="sum", input_ops=[Check(name="check", input_ops=[first])]),
        lambda last: Answer(input_ops=last), conf)
    assert checked["worker_num"] == 1  # Paddle's checked config comes back
    yield executor
    executor.stop()


def test_the_typed_request_goes_in_and_the_typed_answer_comes_out(dag: Any):
    from rexnet_pipelines.paddle_adapter import classify
    from rexnet_pipelines.request import ClassifyRequest

    answer = classify(dag, ClassifyRequest(images=[b"\x01\x02", b"\x03"], model="m"))
    assert answer.ok and answer.model == "m" and answer.probs.tolist() == [3.0, 3.0]


def test_a_stage_refusal_and_a_failed_batch_are_typed_refusals(dag: Any):
    from rexnet_pipelines.paddle_adapter import classify
    from rexnet_pipelines.request import BACKEND_ERROR, ClassifyRequest

    refused = classify(dag, ClassifyRequest(images=[b"x"], model="refuse"))
    assert (refused.status, refused.message) == (51, "invalid_request: refused by the stage")
    failed = classify(dag, ClassifyRequest(images=[b"x"], model="backend-down"))
    # Paddle Serving's wrapping ("[sum] failed to predict. ... Please check the input dict") is taken off.
    assert (failed.status, failed.message) == (BACKEND_ERROR, "inference failed: the backend is down")
    broken = classify(dag, ClassifyRequest(images=[b"x"], model="broken-answer"))
    assert (broken.status, broken.message) == (8000, "rpc package error: no answer")  # typed, as Paddle's would be
    assert classify(dag, ClassifyRequest(images=[b"\x05"], model="m")).probs.tolist() == [5.0]  # still serving
