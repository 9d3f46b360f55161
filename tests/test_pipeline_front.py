"""The Pipeline front doors' translation (rexnet_pipelines.pipeline_front) on Paddle's real protobuf
messages, and FrontDoor.call around it: the typed request a wire request becomes, the wire answer a
typed answer becomes, and what a malformed request costs (its admission slot, given back)."""
from __future__ import annotations

from typing import Any, List

import numpy as np
import pytest
from paddle_serving_server.pipeline.proto import pipeline_service_pb2

from rexnet_serving import pipeline_wire
from rexnet_pipelines.admission import Admission
from rexnet_pipelines.frontdoor import FrontDoor
from rexnet_pipelines.pipeline_front import answer, to_request, to_response
from rexnet_pipelines.request import ClassifyAnswer, ClassifyRequest
from rexnet_serving.results import ImageResult, Prediction


def _message(**fields: Any) -> Any:
    return pipeline_service_pb2.Request(**fields)


def test_keys_values_and_byte_tensors_become_one_typed_request():
    message = _message(key=["image_1", "top_k", "model", "model_version"], value=["b64", " 3 ", "m", "2"], logid=7,
                       tensors=[pipeline_service_pb2.Tensor(name="image_0", elem_type=pipeline_wire.BYTES_ELEM_TYPE,
                                                            byte_data=b"\xff\xd8raw")])
    request = to_request(message)
    assert (request.images, request.top_k, request.model, request.version, request.log_id) == \
        ([b"\xff\xd8raw", "b64"], 3, "m", 2, 7)
    assert request.tensor is None and request.ticket is None
    assert to_request(_message(key=["image"], value=["x"])).top_k is None  # the model's default, later


@pytest.mark.parametrize("fields, code, words", [
    (dict(key=["image", "image"], value=["a", "b"]), "invalid_request", "appears more than once"),
    (dict(key=["image", "top_k"], value=["a"]), "invalid_request", "2 keys but 1 values"),
    (dict(tensors=[pipeline_service_pb2.Tensor(name="image", elem_type=1)]), "invalid_request", "elem_type 1"),
    (dict(key=["image", "colour"], value=["a", "b"]), "unknown_key", "colour"),
    (dict(key=["image_0", "image_2"], value=["a", "b"]), "invalid_key", "without gaps"),
    (dict(key=["top_k"], value=["1"]), "missing_image", "no image"),
    (dict(key=["image", "top_k"], value=["a", "five"]), "invalid_top_k", "must be an integer"),
    (dict(key=["image", "model_version"], value=["a", "²"]), "unknown_model", "ASCII digits"),
])
def test_a_malformed_wire_request_is_a_request_error_naming_what(fields: dict, code: str, words: str):
    with pytest.raises(pipeline_wire.RequestError) as caught:
        to_request(_message(**fields))
    assert caught.value.code == code and words in caught.value.message


def test_the_answer_becomes_err_no_and_results_also_when_no_image_was_classified():
    ok = ClassifyAnswer.classified([ImageResult([Prediction(1, "b", 0.9)])], np.zeros((1, 2), np.float32), "m/1")
    response = to_response(ok)
    assert response.err_no == pipeline_wire.OK and list(response.key) == [pipeline_wire.RESULTS_KEY]
    assert pipeline_wire.decode_results(response.value[0])[0].predictions[0].label == "b"
    bad = ClassifyAnswer.classified([ImageResult.failure("invalid_image", "not an image")],
                                    np.zeros((1, 2), np.float32), "m/1")
    response = to_response(bad)
    assert response.err_no == pipeline_wire.INVALID_IMAGE and "image 0: invalid_image: not an image" in response.err_msg
    assert pipeline_wire.decode_results(response.value[0])[0].error_code == "invalid_image"
    refused = to_response(ClassifyAnswer.refused(pipeline_wire.TIMEOUT, "deadline: dropped"))
    assert (refused.err_no, refused.err_msg, list(refused.key)) == (pipeline_wire.TIMEOUT, "deadline: dropped", [])


class _Dag:
    """Records the typed requests that reach it."""

    def __init__(self) -> None:
        self.requests: List[ClassifyRequest] = []

    def call(self, request: ClassifyRequest) -> ClassifyAnswer:
        self.requests.append(request)
        return ClassifyAnswer(model="m/1")


def test_the_front_door_admits_builds_and_gives_the_slot_back():
    dag, gate = _Dag(), Admission(1, 30, 1024)
    front = FrontDoor(dag, gate, "rexnet")
    malformed = answer(front, _message(key=["image", "image"], value=["a", "b"]))
    assert malformed.err_no == pipeline_wire.INVALID_REQUEST and malformed.err_msg.startswith("invalid_request: key")
    assert dag.requests == [] and gate.in_flight == 0 and gate.preparing == 0
    assert answer(front, _message(key=["image"], value=["a"])).err_no == pipeline_wire.OK
    (request,) = dag.requests
    assert request.ticket is not None and request.deadline == request.ticket.deadline and gate.in_flight == 0
    other = answer(front, _message(name="other", key=["image"], value=["a"]))
    assert other.err_no == pipeline_wire.NO_SERVICE and len(dag.requests) == 1
