"""The ReXNet family against PaddleClas's contract: state-dict names and shapes, counts, forward, loading."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from rexnet_serving.models import (MODELS, VARIANTS, WeightsError, build_model, list_models,
                                   load_weights)

CONTRACT = json.loads((Path(__file__).parent / "fixtures" / "paddleclas_rexnet_state_dicts.json")
                      .read_text())

# Parameter counts (BN statistics included) and paddle.flops at 1x3x224x224, measured with Paddle 2.6.2.
# The published table: 4.838M/0.415G, 7.611M/0.683G, 9.791M/0.900G, 16.449M/1.561G, 34.833M/3.445G.
EXPECTED_COUNTS = {
    "ReXNet_1_0": (4_838_251, 414_580_575),
    "ReXNet_1_3": (7_610_901, 683_387_783),
    "ReXNet_1_5": (9_790_673, 900_243_919),
    "ReXNet_2_0": (16_449_380, 1_561_323_958),
    "ReXNet_3_0": (34_832_956, 3_444_779_406),
}

ALL = list_models()


def test_registry_names_are_paddleclas_names():
    assert ALL == ["ReXNet_1_0", "ReXNet_1_3", "ReXNet_1_5", "ReXNet_2_0", "ReXNet_3_0"]
    assert set(VARIANTS) == set(MODELS) == set(CONTRACT)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_names_shapes_and_order_match_paddleclas(name):
    model = build_model(name)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert len(ours) == 351
    assert ours == CONTRACT[name]["state_dict"]


@pytest.mark.parametrize("name", ALL)
def test_parameter_and_flop_counts(name):
    model = build_model(name)
    params = sum(int(np.prod(v.shape)) for v in model.state_dict().values())
    assert params == CONTRACT[name]["num_params"] == EXPECTED_COUNTS[name][0]
    flops = paddle.flops(model, [1, 3, 224, 224], print_detail=False)
    assert flops == EXPECTED_COUNTS[name][1]


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_batch_1_and_4(name):
    model = build_model(name)
    model.eval()
    with paddle.no_grad():
        one = model(paddle.randn([1, 3, 224, 224]))
        four = model(paddle.randn([4, 3, 96, 96]))
    assert one.shape == [1, 1000] and four.shape == [4, 1000]
    assert np.isfinite(one.numpy()).all() and np.isfinite(four.numpy()).all()


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name):
    paddle.seed(0)
    model = build_model(name, class_num=7)
    model.train()
    loss = model(paddle.randn([2, 3, 64, 64])).mean()
    loss.backward()
    trainable = [p for p in model.parameters() if not p.stop_gradient]  # BN statistics are not trained
    bn_layers = sum(isinstance(m, paddle.nn.BatchNorm2D) for m in model.sublayers())
    assert len(trainable) == len(model.parameters()) - 2 * bn_layers
    missing = [p.name for p in trainable if p.grad is None]
    assert not missing
    assert all(np.isfinite(p.grad.numpy()).all() for p in trainable)


@pytest.mark.parametrize("class_num", [1, 10, 21843])
def test_other_class_counts_and_classifier_reset(class_num):
    model = build_model("ReXNet_1_0", class_num=class_num)
    model.eval()
    out = model(paddle.randn([2, 3, 64, 64]))
    assert out.shape == [2, class_num]
    model.reset_classifier(5)
    assert model(paddle.randn([2, 3, 64, 64])).shape == [2, 5]
    assert model.state_dict()["output.1.weight"].shape == [5, 1280, 1, 1]


def test_dropout_is_an_argument():
    assert build_model("ReXNet_1_0").output[0].p == 0.2
    assert build_model("ReXNet_1_0", dropout=0.5).output[0].p == 0.5


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'ReXNet_9_9'.*ReXNet_1_0"):
        build_model("ReXNet_9_9")


def test_partial_residual_exports_without_set_value(tmp_path):
    model = build_model("ReXNet_1_0")
    model.eval()
    static = paddle.jit.to_static(
        model, input_spec=[paddle.static.InputSpec([None, 3, 224, 224], "float32", "x")],
        full_graph=True)
    program = static.forward.concrete_program.main_program
    op_types = {op.type for op in program.global_block().ops}
    assert "set_value" not in op_types
    assert "concat" in op_types


# --- loading weights -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_1_0(tmp_path_factory):
    paddle.seed(1)
    model = build_model("ReXNet_1_0")
    path = tmp_path_factory.mktemp("weights") / "ReXNet_1_0.pdparams"
    paddle.save(model.state_dict(), str(path))
    return model, path


def test_strict_load_round_trip(saved_1_0):
    source, path = saved_1_0
    target = build_model("ReXNet_1_0")
    assert load_weights(target, str(path)) == []
    for (k, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)


def test_strict_load_lists_missing_unexpected_and_misshaped_keys(saved_1_0, tmp_path):
    _, path = saved_1_0
    state = paddle.load(str(path))
    del state["features.0.weight"]
    state["features.99.weight"] = paddle.zeros([3])
    state["output.1.bias"] = paddle.zeros([10])
    broken = tmp_path / "broken.pdparams"
    paddle.save(state, str(broken))
    with pytest.raises(WeightsError) as err:
        load_weights(build_model("ReXNet_1_0"), str(broken))
    text = str(err.value)
    assert "missing key: features.0.weight [32, 3, 3, 3]" in text
    assert "unexpected key: features.99.weight [3]" in text
    assert "shape mismatch: output.1.bias is [10] in the file, [1000] in the model" in text


def test_wrong_width_is_refused(saved_1_0):
    _, path = saved_1_0
    with pytest.raises(WeightsError, match="does not fit"):
        load_weights(build_model("ReXNet_1_3"), str(path))


def test_drop_classifier_for_fine_tuning(saved_1_0):
    source, path = saved_1_0
    target = build_model("ReXNet_1_0", class_num=10)
    fresh_head = target.output[1].weight.numpy().copy()
    assert load_weights(target, str(path), drop_classifier=True) == []
    np.testing.assert_array_equal(target.features[0].weight.numpy(),
                                  source.features[0].weight.numpy())
    np.testing.assert_array_equal(target.output[1].weight.numpy(), fresh_head)


def test_non_strict_load_returns_problems_and_loads_the_rest(saved_1_0):
    source, path = saved_1_0
    target = build_model("ReXNet_1_0", class_num=10)
    problems = load_weights(target, str(path), strict=False)
    assert sorted(p.split(":")[0] for p in problems) == ["shape mismatch", "shape mismatch"]
    np.testing.assert_array_equal(target.features[1]._mean.numpy(),
                                  source.features[1]._mean.numpy())


def test_checkpoint_dict_with_model_key_loads(saved_1_0, tmp_path):
    source, path = saved_1_0
    checkpoint = tmp_path / "epoch_3.pdparams"
    paddle.save({"model": paddle.load(str(path)), "epoch": 3}, str(checkpoint))
    target = build_model("ReXNet_1_0")
    load_weights(target, str(checkpoint))
    np.testing.assert_array_equal(target.output[1].bias.numpy(), source.output[1].bias.numpy())


@pytest.mark.parametrize("content, reason", [
    (None, "weights file not found"),
    (b"", "cannot read weights file"),
    (b"\x80\x04garbage that is not a pickle", "cannot read weights file"),
    ("truncated", "cannot read weights file"),
])
def test_corrupt_missing_or_truncated_weights_are_clear_errors(saved_1_0, tmp_path, content, reason):
    _, good = saved_1_0
    path = tmp_path / "w.pdparams"
    if content == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=reason) as err:
        load_weights(build_model("ReXNet_1_0"), str(path))
    assert str(path) in str(err.value)
