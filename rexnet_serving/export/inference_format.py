"""The Paddle Inference format: ``inference/inference.pdmodel`` + ``inference.pdiparams``.

``paddle.jit.save`` of the eval model (PaddleClas's ``tools/export_model.py`` does the same), with a
softmax appended unless logits are asked for. The output variable is renamed from jit.save's
``save_infer_model/scale_0.tmp_0`` to ``probs``/``logits``: Paddle Serving's LocalPredictor matches
fetch names against the program's real output names (an alias only works through a positional
fallback), so a readable real name keeps feed/fetch name == alias in every Serving config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import paddle
from paddle import nn

from ..manifest import MODEL_FILE, PARAMS_FILE

MODEL_PREFIX = MODEL_FILE[:-len(".pdmodel")]  # paddle.jit.save appends .pdmodel/.pdiparams
FEED_NAME = "x"
PROBS_NAME = "probs"
LOGITS_NAME = "logits"


class WithSoftmax(nn.Layer):
    """The classifier with a softmax over classes, so served outputs are probabilities."""

    def __init__(self, model: nn.Layer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return nn.functional.softmax(self.model(x), axis=-1)


def _rename_output(model_file: Path, new_name: str) -> None:
    """Rename the program's single fetch target in ``model_file`` (an inference ProgramDesc).

    Works on the C++ ProgramDesc, whose ``_rename_var`` also rewrites every op's reference; the
    Python ``Program`` wrapper would need static mode switched on globally.
    """
    desc = paddle.framework.core.ProgramDesc(model_file.read_bytes())
    block = desc.block(0)
    fetch_inputs = [block.op(i).input("X")[0] for i in range(block.op_size())
                    if block.op(i).type() == "fetch"]
    if len(fetch_inputs) != 1:
        raise RuntimeError(f"{model_file}: expected one fetch target, found {fetch_inputs}")
    block._rename_var(fetch_inputs[0].encode(), new_name.encode())
    model_file.write_bytes(desc.serialize_to_string())


def save_inference_model(model: nn.Layer, out_dir: Path, input_size: int,
                         softmax: bool = True) -> Tuple[str, str]:
    """Write ``out_dir/inference.pd{model,iparams}`` for NCHW float32 input of any batch size.

    Returns the real (feed name, fetch name), read back from a predictor on the written files.
    """
    model.eval()
    net = WithSoftmax(model) if softmax else model
    net.eval()
    spec = [paddle.static.InputSpec([None, 3, input_size, input_size], "float32", name=FEED_NAME)]
    out_dir.mkdir(parents=True, exist_ok=True)
    static_net = paddle.jit.to_static(net, input_spec=spec, full_graph=True)
    paddle.jit.save(static_net, str(out_dir / MODEL_PREFIX), input_spec=spec)
    _rename_output(out_dir / MODEL_FILE, PROBS_NAME if softmax else LOGITS_NAME)
    return read_io_names(out_dir)


def read_io_names(model_dir: Path) -> Tuple[str, str]:
    """(feed name, fetch name) of the single-input, single-output program in ``model_dir``."""
    from paddle import inference as paddle_infer
    config = paddle_infer.Config(str(model_dir / MODEL_FILE), str(model_dir / PARAMS_FILE))
    config.disable_glog_info()
    config.switch_ir_optim(False)  # only the names are needed: skip the optimisation passes
    predictor = paddle_infer.create_predictor(config)
    inputs, outputs = predictor.get_input_names(), predictor.get_output_names()
    if len(inputs) != 1 or len(outputs) != 1:
        raise RuntimeError(f"{model_dir}: expected one input and one output, got {inputs} -> {outputs}")
    return inputs[0], outputs[0]
